"""Download a file once, verified by its sha256.

Only https URLs are fetched, except plain http to a loopback host (127.0.0.0/8, ::1,
localhost), which tests serve; redirects are held to the same rule. The file name is the
last component of the URL's path (or the sha256 when the path has none). The body streams
into a temporary file in ``dest_dir`` and is renamed into place only after its sha256
matched, so a failed or mismatched download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from sae_core.io import UMASK, one_line, sha256_file

DEFAULT_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"[0-9a-f]{64}")



def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str) -> bool:
    """ValueError unless ``url`` may be fetched; True when it is a loopback http URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return False
    if parts.scheme == "http" and _is_loopback(host):
        return True
    raise ValueError(f"{url}: only https URLs are fetched (http only from loopback hosts)")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def file_name(url: str, sha256: str) -> str:
    """The name ``fetch`` saves ``url`` under: the URL path's last component, or sha256."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return sha256 if name in ("", ".", "..") or "\x00" in name else name


def fetch(
    url: str,
    sha256: str,
    dest_dir: str | os.PathLike,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download ``url`` into ``dest_dir`` unless a file with ``sha256`` is already there.

    Returns the file's path. An existing file with the right sha256 is returned without
    any network access; one with another sha256 is downloaded again (and replaced only if
    the new body matches). Errors are one-line ``ValueError`` naming the URL: a refused
    scheme or host, a network or HTTP error, a truncated body, and a mismatch
    ("<url>: sha256 is X, expected Y").
    """
    expected = str(sha256).lower()
    if not _SHA256.fullmatch(expected):
        raise ValueError(f"{url}: sha256 must be 64 hex digits; got {sha256!r}")
    loopback = _check_url(url)
    dest = Path(dest_dir) / file_name(url, expected)
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    # Loopback requests bypass any proxy from the environment; https keeps the user's.
    handlers = [_CheckedRedirects()]
    if loopback:
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise ValueError(f"{dest.parent}: cannot write ({one_line(exc)})") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        n_bytes = 0
        try:
            with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                limit = int(length) if length is not None and length.isdigit() else None
                for block in iter(lambda: resp.read(1 << 20), b""):
                    n_bytes += len(block)
                    if limit is not None and n_bytes > limit:  # a body past its length
                        raise ValueError(f"{url}: the server sent more than the "
                                         f"{limit} bytes it announced")
                    out.write(block)
                    digest.update(block)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts: OSError
            raise ValueError(f"{url}: download failed ({one_line(exc)})") from None
        if length is not None and length.isdigit() and int(length) != n_bytes:
            raise ValueError(f"{url}: truncated download ({n_bytes} of {length} bytes)")
        got = digest.hexdigest()
        if got != expected:
            raise ValueError(f"{url}: sha256 is {got}, expected {expected}")
        try:
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600
            os.replace(tmp, dest)
        except OSError as exc:
            raise ValueError(f"{dest}: cannot write ({one_line(exc)})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest
