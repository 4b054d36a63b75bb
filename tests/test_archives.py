"""Safe archive extraction: good archives extract; unsafe members are refused whole."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from sae_core.archives import extract_archive

FILES = {"a/one.txt": b"one", "a/b/two.bin": bytes(range(256)), "top.txt": b"top"}


def add_tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", extra=()) -> Path:
    with tarfile.open(path, mode) as tf:
        dir_info = tarfile.TarInfo("a")
        dir_info.type = tarfile.DIRTYPE
        tf.addfile(dir_info)
        for name, data in files.items():
            add_tar_file(tf, name, data)
        for info in extra:
            tf.addfile(info)
    return path


def make_zip(path: Path, files: dict[str, bytes], extra=()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_nothing_left(tmp_path: Path, keep: set[str]) -> None:
    """Only the archives themselves remain: no target, no temporary folder, no escapee."""
    assert {p.name for p in tmp_path.iterdir()} == keep


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_tar_extracts(tmp_path, suffix, mode):
    archive = make_tar(tmp_path / f"data{suffix}", FILES, mode)
    out = extract_archive(archive, tmp_path / "out")
    assert out == tmp_path / "out"
    assert tree(out) == FILES
    assert_nothing_left(tmp_path, {archive.name, "out"})


def test_zip_extracts(tmp_path):
    archive = make_zip(tmp_path / "data.zip", {**FILES, "empty_dir/": b""})
    out = extract_archive(archive, tmp_path / "nested" / "out")
    assert tree(out) == FILES and (out / "empty_dir").is_dir()


def test_existing_nonempty_target_is_refused(tmp_path):
    archive = make_zip(tmp_path / "data.zip", FILES)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already exists"):
        extract_archive(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == {"keep.txt": b"mine"}
    (tmp_path / "out" / "keep.txt").unlink()  # an empty folder is fine
    assert tree(extract_archive(archive, tmp_path / "out")) == FILES


@pytest.mark.parametrize(
    "bad,why",
    [("../escaped.txt", r"'\.\.'"), ("a/../../escaped.txt", r"'\.\.'"), ("ABS", "absolute")],
)
def test_tar_traversal_member_refused_and_nothing_extracted(tmp_path, bad, why):
    bad = str(tmp_path / "escaped.txt") if bad == "ABS" else bad
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tf:
        add_tar_file(tf, "good.txt", b"fine")
        add_tar_file(tf, bad, b"pwned")
    with pytest.raises(ValueError, match=why) as info:
        extract_archive(tmp_path / "evil.tar.gz", tmp_path / "out")
    msg = str(info.value)
    assert "evil.tar.gz" in msg and repr(bad) in msg and "\n" not in msg
    assert_nothing_left(tmp_path, {"evil.tar.gz"})


@pytest.mark.parametrize("bad", ["../escaped.txt", "ABS", "a\\..\\escaped.txt"])
def test_zip_traversal_member_refused_and_nothing_extracted(tmp_path, bad):
    bad = str(tmp_path / "escaped.txt") if bad == "ABS" else bad
    archive = make_zip(tmp_path / "evil.zip", {"good.txt": b"fine"}, [(zipfile.ZipInfo(bad), b"x")])
    assert bad in zipfile.ZipFile(archive).namelist()  # zipfile kept the name as given
    with pytest.raises(ValueError, match=r"evil.zip: member .* refused"):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"evil.zip"})


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_refused(tmp_path, link_type):
    link = tarfile.TarInfo("a/link")
    link.type = link_type
    link.linkname = "/etc/passwd" if link_type == tarfile.SYMTYPE else "top.txt"
    archive = make_tar(tmp_path / "links.tgz", FILES, extra=[link])
    with pytest.raises(ValueError, match=r"links.tgz: member 'a/link' refused \((symbolic|hard)"):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"links.tgz"})


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_tar_devices_and_fifos_refused(tmp_path, kind):
    dev = tarfile.TarInfo("dev")
    dev.type = kind
    archive = make_tar(tmp_path / "dev.tar", FILES, "w", extra=[dev])
    with pytest.raises(ValueError, match=r"member 'dev' refused"):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"dev.tar"})


def test_zip_symlink_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "ln.zip", FILES, [(info, "/etc/passwd")])
    with pytest.raises(ValueError, match=r"ln.zip: member 'link' refused .symbolic link"):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"ln.zip"})


def test_corrupt_archives_are_value_errors_naming_the_file(tmp_path):
    good = make_tar(tmp_path / "good.tar.gz", FILES).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.zip").write_bytes(b"this is not a zip file" * 10)
    zipped = make_zip(tmp_path / "z.zip", FILES).read_bytes()
    assert zipped.count(bytes(range(100, 120))) == 1  # stored, not compressed
    (tmp_path / "z.zip").write_bytes(zipped.replace(bytes(range(100, 120)), bytes(20)))  # bad CRC
    for name in ("cut.tar.gz", "junk.zip", "z.zip"):
        with pytest.raises(ValueError, match=f"{name}: corrupt or unreadable archive") as info:
            extract_archive(tmp_path / name, tmp_path / "out")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ValueError, match=r"nope.zip: file not found"):
        extract_archive(tmp_path / "nope.zip", tmp_path / "out")
    (tmp_path / "x.rar").write_bytes(b"Rar!")
    with pytest.raises(ValueError, match=r"x.rar: not a supported archive"):
        extract_archive(tmp_path / "x.rar", tmp_path / "out")


@pytest.mark.parametrize("cap", ["MAX_ARCHIVE_BYTES", "MAX_ARCHIVE_MEMBERS"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_over_the_caps_is_refused_from_its_index(tmp_path, monkeypatch, cap, kind):
    """The caps are checked against the sizes and count the index declares, before
    anything is written (here lowered, so that a small archive is over them)."""
    from sae_core import archives

    files = {"a.bin": bytes(3000), "b.bin": bytes(3000), "c.bin": bytes(3000)}
    archive = (make_zip(tmp_path / "x.zip", files) if kind == "zip"
               else make_tar(tmp_path / "x.tar.gz", files))
    monkeypatch.setattr(archives, cap, 5000 if cap == "MAX_ARCHIVE_BYTES" else 2)
    with pytest.raises(ValueError) as info:
        extract_archive(archive, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and str(archive) in message
    assert message.endswith("members declare 9,000 bytes, over the limit of 5,000 bytes"
                            if cap == "MAX_ARCHIVE_BYTES" else "members, over the limit of 2")
    assert_nothing_left(tmp_path, {archive.name})


def test_an_archive_larger_than_the_free_space_is_refused(tmp_path, monkeypatch):
    import shutil as sh

    from sae_core import archives

    archive = make_zip(tmp_path / "x.zip", {"a.bin": bytes(5000)})
    monkeypatch.setattr(archives.shutil, "disk_usage",
                        lambda p: sh._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ValueError, match=r"x\.zip: members declare 5,000 bytes, more than the "
                       r"100 bytes free in "):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"x.zip"})
