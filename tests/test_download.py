"""fetch: verified downloads from an HTTP server on 127.0.0.1 that the test starts."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from sae_core.download import fetch

BODY = b"pixels " * 1000
SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """Serves ``files`` (path -> bytes); counts requests per path; redirects /r/... ."""

    def __init__(self):
        self.files: dict[str, bytes] = {"/data/batch.bin": BODY, "/": BODY}
        self.requests: list[str] = []
        self.redirects: dict[str, str] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self):
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_downloads_once_then_uses_the_local_file(server, tmp_path):
    url = f"{server.url}/data/batch.bin"
    path = fetch(url, SHA, tmp_path / "dl")
    assert path == tmp_path / "dl" / "batch.bin" and path.read_bytes() == BODY
    assert server.requests == ["/data/batch.bin"]
    assert fetch(url, SHA.upper(), tmp_path / "dl") == path  # no second request
    assert server.requests == ["/data/batch.bin"]
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["batch.bin"]


def test_sha256_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    url = f"{server.url}/data/batch.bin"
    wrong = "0" * 64
    with pytest.raises(ValueError) as info:
        fetch(url, wrong, tmp_path / "dl")
    assert str(info.value) == f"{url}: sha256 is {SHA}, expected {wrong}"
    assert list((tmp_path / "dl").iterdir()) == []


def test_a_wrong_local_file_is_downloaded_again(server, tmp_path):
    (tmp_path / "batch.bin").write_bytes(b"stale")
    path = fetch(f"{server.url}/data/batch.bin", SHA, tmp_path)
    assert path.read_bytes() == BODY and len(server.requests) == 1


def test_name_is_the_sha256_when_the_url_has_no_path(server, tmp_path):
    assert fetch(server.url + "/", SHA, tmp_path).name == SHA


def test_http_errors_name_the_url(server, tmp_path):
    url = f"{server.url}/missing.bin"
    with pytest.raises(ValueError, match=f"{url}: download failed .*404") as info:
        fetch(url, SHA, tmp_path)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
    server.close()
    with pytest.raises(ValueError, match=r"download failed"):
        fetch(f"{server.url}/data/batch.bin", SHA, tmp_path)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/x.bin", "ftp://127.0.0.1/x.bin", "file:///etc/passwd", "https:///x"],
)
def test_only_https_or_loopback_http(url, tmp_path):
    with pytest.raises(ValueError, match=r"only https URLs"):
        fetch(url, SHA, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_redirect_to_a_refused_url_is_refused(server, tmp_path):
    server.redirects["/r"] = "http://example.com/batch.bin"
    with pytest.raises(ValueError, match=r"http://example.com/batch.bin: only https"):
        fetch(f"{server.url}/r", SHA, tmp_path)
    server.redirects["/ok"] = f"{server.url}/data/batch.bin"
    assert fetch(f"{server.url}/ok", SHA, tmp_path).read_bytes() == BODY


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(ValueError, match=r"64 hex digits"):
        fetch("https://example.com/x", "abc", tmp_path)
