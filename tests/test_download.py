"""ood.data.download: verified, atomic, resumable fetches from a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from http_server import Fault, FileServer

from ood.data.download import DownloadError, check_spec, fetch

FAST = {"attempts": 3, "backoff": 0.0, "timeout": 5.0, "progressbar": False}
CIFAR = {
    "cifar-10-batches-py/data_batch_1": os.urandom(3000),
    "cifar-10-batches-py/batches.meta": b"label_names: airplane automobile",
    "imagenet/meta.mat": b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(200),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".fetch.json"
    }


def everything(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FileServer(timeout=5.0) as srv:
        yield srv


@pytest.fixture
def dirs(tmp_path):
    """(out, cache): `out` holds dest and nothing else, so leftovers are easy to see."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    return out, cache


def assert_clean_failure(out: Path, cache: Path | None = None, dest_name: str = "ds") -> None:
    assert not (out / dest_name).exists()
    assert everything(out) == [], f"left behind: {everything(out)}"
    if cache is not None and cache.exists():
        assert [p for p in everything(cache) if (cache / p).is_file()] == []


# --- successful fetches -----------------------------------------------------------------------


def test_url_tar_gz_extracts_verifies_and_caches(server, dirs, caplog):
    caplog.set_level(logging.INFO, logger="ood.data.download")
    out, cache = dirs
    members = {**CIFAR, "images/0.png": png_bytes()}
    data = make_tar(members)
    server.files["/cifar-10-python.tar.gz"] = data
    spec = {"url": server.url("/cifar-10-python.tar.gz"), "sha256": sha(data)}

    dest = fetch("cifar10", spec, out / "ds", cache, **FAST)

    assert dest == out / "ds"
    assert tree(dest) == members
    record = json.loads((dest / ".fetch.json").read_text())
    assert record == {
        "name": "cifar10",
        "url": spec["url"],
        "sha256": sha(data),
        "format": "tar.gz",
        "filename": "cifar-10-python.tar.gz",
    }
    assert f"fetched cifar10: {spec['url']} (tar.gz, sha256 {sha(data)[:12]})" in caplog.text
    assert (cache / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == data
    assert len(server.hits("/cifar-10-python.tar.gz")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["ds"]

    # A rerun rebuilds dest from the verified cache without touching the server.
    (dest / "stray.txt").write_text("from an older build")
    fetch("cifar10", spec, dest, cache, **FAST)
    assert tree(dest) == members
    assert len(server.hits("/cifar-10-python.tar.gz")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["ds"]


def test_url_zip(server, dirs):
    out, cache = dirs
    members = {"ssb/hard/0.png": png_bytes(), "ssb/labels.txt": b"0 hard\n"}
    data = make_zip(members)
    server.files["/ssb.zip"] = data
    dest = fetch("ssb", {"url": server.url("/ssb.zip"), "sha256": sha(data)}, out / "ds", cache)
    assert tree(dest) == members
    assert json.loads((dest / ".fetch.json").read_text())["format"] == "zip"


def test_url_plain_file_with_filename_and_uppercase_sha(server, dirs):
    out, cache = dirs
    data = CIFAR["imagenet/meta.mat"]
    server.files["/download"] = data  # the query string is ignored by the server
    spec = {
        "url": server.url("/download?id=7"),
        "sha256": sha(data).upper(),
        "format": "file",
        "filename": "meta.mat",
    }
    dest = fetch("meta", spec, out / "ds", cache, **FAST)
    assert tree(dest) == {"meta.mat": data}
    record = json.loads((dest / ".fetch.json").read_text())
    assert record["sha256"] == sha(data) and record["filename"] == "meta.mat"


def test_file_url(dirs, tmp_path):
    out, cache = dirs
    data = make_tar(CIFAR, mode="w")
    source = tmp_path / "mirror" / "cifar.tar"
    source.parent.mkdir()
    source.write_bytes(data)
    spec = {"url": source.as_uri(), "sha256": sha(data)}
    dest = fetch("cifar_mirror", spec, out / "ds", cache, **FAST)
    assert tree(dest) == CIFAR
    assert (cache / "cifar_mirror" / "cifar.tar").read_bytes() == data

    missing = {"url": (tmp_path / "nope.tar").as_uri(), "sha256": sha(data)}
    with pytest.raises(DownloadError, match=r"nope\.tar"):
        fetch("gone", missing, out / "other", cache, **FAST)


@pytest.mark.parametrize("with_sha", [True, False])
def test_path_source(dirs, tmp_path, with_sha):
    out, cache = dirs
    data = make_tar(CIFAR)
    archive = tmp_path / "licensed" / "ILSVRC_val.tgz"
    archive.parent.mkdir()
    archive.write_bytes(data)
    spec = {"path": str(archive), **({"sha256": sha(data)} if with_sha else {})}
    dest = fetch("imagenet_val", spec, out / "ds", cache, **FAST)
    assert tree(dest) == CIFAR
    record = json.loads((dest / ".fetch.json").read_text())
    assert record["path"] == str(archive)
    assert record["sha256"] == sha(data)  # computed when not given
    assert record["format"] == "tgz"
    assert not cache.exists()  # local files are read in place


def test_path_source_plain_file_and_folder(dirs, tmp_path):
    out, cache = dirs
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01" * 50)
    dest = fetch("w", {"path": str(weights), "format": "file"}, out / "w", cache)
    assert tree(dest) == {"weights.bin": weights.read_bytes()}

    folder = tmp_path / "ILSVRC2012_train"
    (folder / "n01440764").mkdir(parents=True)
    dest = fetch("train", {"path": str(folder), "format": "dir"}, out / "train", cache)
    link = dest / "ILSVRC2012_train"
    assert link.is_symlink() and link.resolve() == folder.resolve()
    assert json.loads((dest / ".fetch.json").read_text())["sha256"] is None


# --- retries and resumption -------------------------------------------------------------------


def test_retry_after_server_errors(server, dirs):
    out, cache = dirs
    data = make_tar(CIFAR)
    server.files["/flaky.tar.gz"] = data
    server.faults["/flaky.tar.gz"] = Fault(fail=2)
    spec = {"url": server.url("/flaky.tar.gz"), "sha256": sha(data)}
    dest = fetch("flaky", spec, out / "ds", cache, **FAST)
    assert tree(dest) == CIFAR
    assert len(server.hits("/flaky.tar.gz")) == 3


def test_server_errors_exhaust_attempts(server, dirs):
    out, cache = dirs
    server.files["/down.tar.gz"] = b"x"
    server.faults["/down.tar.gz"] = Fault(fail=99)
    spec = {"url": server.url("/down.tar.gz"), "sha256": sha(b"x")}
    with pytest.raises(DownloadError, match=r"down\.tar\.gz.*3 attempt.*HTTP 500"):
        fetch("down", spec, out / "ds", cache, **FAST)
    assert len(server.hits("/down.tar.gz")) == 3
    assert_clean_failure(out, cache)


def test_resume_from_partial_file(server, dirs):
    out, cache = dirs
    members = {**CIFAR, "big.bin": os.urandom(20000)}
    data = make_tar(members)
    half = len(data) // 2
    server.files["/big.tar.gz"] = data
    part = cache / "big" / "big.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:half])

    dest = fetch("big", {"url": server.url("/big.tar.gz"), "sha256": sha(data)}, out / "ds", cache)

    hits = server.hits("/big.tar.gz")
    assert [h.range for h in hits] == [f"bytes={half}-"]
    assert tree(dest) == members
    assert (cache / "big" / "big.tar.gz").read_bytes() == data
    assert not part.exists()


def test_complete_partial_file_is_not_downloaded_again(server, dirs):
    out, cache = dirs
    data = make_zip(CIFAR)
    server.files["/done.zip"] = data
    part = cache / "done" / "done.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)  # a run that stopped between the last byte and the hand-over
    dest = fetch("done", {"url": server.url("/done.zip"), "sha256": sha(data)}, out / "ds", cache)
    assert tree(dest) == CIFAR
    assert [h.range for h in server.hits("/done.zip")] == [f"bytes={len(data)}-"]  # a 416


def test_dropped_connection_resumes_on_the_next_attempt(server, dirs):
    out, cache = dirs
    members = {**CIFAR, "big.bin": os.urandom(20000)}
    data = make_tar(members)
    server.files["/cut.tar.gz"] = data
    server.faults["/cut.tar.gz"] = Fault(truncate=1000, times=1)
    spec = {"url": server.url("/cut.tar.gz"), "sha256": sha(data)}
    dest = fetch("cut", spec, out / "ds", cache, **FAST)
    assert [h.range for h in server.hits("/cut.tar.gz")] == [None, "bytes=1000-"]
    assert tree(dest) == members


def test_server_without_range_support_restarts_from_zero(server, dirs):
    out, cache = dirs
    data = make_zip(CIFAR)
    server.files["/norange.zip"] = data
    server.faults["/norange.zip"] = Fault(ignore_range=True)
    part = cache / "nr" / "norange.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not be kept")
    dest = fetch("nr", {"url": server.url("/norange.zip"), "sha256": sha(data)}, out / "ds", cache)
    assert tree(dest) == CIFAR


def test_stale_partial_file_is_discarded_after_a_mismatch(server, dirs):
    out, cache = dirs
    data = make_tar(CIFAR)
    server.files["/stale.tar.gz"] = data
    part = cache / "stale" / "stale.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 100)  # bytes of some other file: the joined result mismatches
    spec = {"url": server.url("/stale.tar.gz"), "sha256": sha(data)}
    dest = fetch("stale", spec, out / "ds", cache, **FAST)
    assert tree(dest) == CIFAR
    assert [h.range for h in server.hits("/stale.tar.gz")] == ["bytes=100-", None]


# --- failures leave nothing half-written -------------------------------------------------------


def test_checksum_mismatch(server, dirs):
    out, cache = dirs
    data = make_tar(CIFAR)
    wrong = sha(b"something else")
    server.files["/c.tar.gz"] = data
    spec = {"url": server.url("/c.tar.gz"), "sha256": wrong}
    with pytest.raises(DownloadError, match=rf"c\.tar\.gz.*expected {wrong}, got {sha(data)}"):
        fetch("c", spec, out / "ds", cache, **FAST)
    assert len(server.hits("/c.tar.gz")) == 1  # a fresh transfer that mismatches is not retried
    assert_clean_failure(out, cache)


def test_path_checksum_mismatch_and_missing_path(dirs, tmp_path):
    out, cache = dirs
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip(CIFAR))
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=rf"a\.zip: sha256 mismatch: expected {wrong}, got"):
        fetch("a", {"path": str(archive), "sha256": wrong}, out / "ds", cache)
    with pytest.raises(DownloadError, match=r"missing\.zip: no such file"):
        fetch("a", {"path": str(tmp_path / "missing.zip")}, out / "ds", cache)
    assert_clean_failure(out)


def test_truncated_transfer_that_never_completes(server, dirs):
    out, cache = dirs
    data = make_tar({"big.bin": os.urandom(50000)})
    server.files["/t.tar.gz"] = data
    server.faults["/t.tar.gz"] = Fault(truncate=1000)
    spec = {"url": server.url("/t.tar.gz"), "sha256": sha(data)}
    with pytest.raises(DownloadError, match=r"t\.tar\.gz.*failed after 3 attempt.*ended at byte"):
        fetch("t", spec, out / "ds", cache, **FAST)
    assert [h.range for h in server.hits("/t.tar.gz")] == [None, "bytes=1000-", "bytes=2000-"]
    assert_clean_failure(out)
    # Only the partial transfer stays in the cache, for a later run to resume.
    assert everything(cache) == ["t", "t/t.tar.gz.part"]
    assert (cache / "t" / "t.tar.gz.part").read_bytes() == data[:3000]


@pytest.mark.parametrize(
    ("filename", "pattern"),
    [
        ("junk.tar.gz", r"junk\.tar\.gz: not a readable tar\.gz archive"),
        ("junk.zip", r"junk\.zip: not a readable zip archive"),
    ],
)
def test_corrupt_archive(server, dirs, filename, pattern):
    out, cache = dirs
    data = os.urandom(4096)
    server.files[f"/{filename}"] = data
    spec = {"url": server.url(f"/{filename}"), "sha256": sha(data)}
    with pytest.raises(DownloadError, match=pattern):
        fetch("junk", spec, out / "ds", cache, **FAST)
    assert_clean_failure(out)


def test_truncated_archive_content(dirs, tmp_path):
    out, cache = dirs
    data = make_tar({"a.bin": os.urandom(20000)})
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match=r"cut\.tar\.gz: not a readable tgz archive"):
        fetch("cut", {"path": str(archive), "format": "tgz"}, out / "ds", cache)
    assert_clean_failure(out)


def _tar_with(*infos: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in infos:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink-up", "symlink-abs", "via-link"])
def test_unsafe_tar_members(server, tmp_path, kind):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    outside = tmp_path / "outside"
    ok = (tarfile.TarInfo("fine.txt"), b"fine")
    member, infos = {
        "dotdot": ("../evil.txt", [(tarfile.TarInfo("../evil.txt"), b"x")]),
        "absolute": (f"{outside}/evil.txt", [(tarfile.TarInfo(f"{outside}/evil.txt"), b"x")]),
        "symlink-up": ("link", [(_symlink("link", "../../outside"), b"")]),
        "symlink-abs": ("link", [(_symlink("link", str(outside)), b"")]),
        # a link to dest's parent, then a file written through it
        "via-link": (
            "up",
            [(_symlink("up", ".."), b""), (tarfile.TarInfo("up/evil.txt"), b"x")],
        ),
    }[kind]
    data = _tar_with(ok, *infos)
    server.files["/evil.tar.gz"] = data
    spec = {"url": server.url("/evil.tar.gz"), "sha256": sha(data)}
    with pytest.raises(DownloadError, match=rf"evil\.tar\.gz: unsafe member '{member}'"):
        fetch("evil", spec, out / "ds", cache, **FAST)
    assert_clean_failure(out)
    assert not outside.exists()
    assert [p for p in tmp_path.rglob("evil.txt")] == []


def _zip_symlink(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "member"),
    [
        pytest.param(make_zip({"ok.txt": b"ok", "../evil.txt": b"x"}), "../evil.txt", id="dotdot"),
        pytest.param(make_zip({"/abs_evil.txt": b"x"}), "/abs_evil.txt", id="absolute"),
        pytest.param(_zip_symlink("link", "../../outside"), "link", id="symlink"),
    ],
)
def test_unsafe_zip_members(tmp_path, data, member):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    archive = tmp_path / "evil.zip"
    archive.write_bytes(data)
    with pytest.raises(DownloadError, match=rf"evil\.zip: unsafe member '{member}'"):
        fetch("evil", {"path": str(archive)}, out / "ds", cache)
    assert_clean_failure(out)
    assert [p for p in tmp_path.rglob("*") if "evil.txt" in p.name] == []


def test_older_dest_survives_a_failed_refetch(server, dirs):
    out, cache = dirs
    old = out / "ds"
    old.mkdir()
    (old / "data_batch_1").write_bytes(b"older, complete copy")
    data = make_tar(CIFAR)
    server.files["/new.tar.gz"] = data
    bad = {"url": server.url("/new.tar.gz"), "sha256": "f" * 64}
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch("new", bad, old, cache, **FAST)
    assert tree(old) == {"data_batch_1": b"older, complete copy"}
    assert sorted(p.name for p in out.iterdir()) == ["ds"]

    fetch("new", {**bad, "sha256": sha(data)}, old, cache, **FAST)
    assert tree(old) == CIFAR  # a successful refetch replaces it whole
    assert sorted(p.name for p in out.iterdir()) == ["ds"]


def test_http_404_names_the_url(server, dirs):
    out, cache = dirs
    url = server.url("/missing.tar.gz")
    with pytest.raises(DownloadError, match=rf"{url}: HTTP 404"):
        fetch("m", {"url": url, "sha256": "a" * 64}, out / "ds", cache, **FAST)
    assert len(server.hits("/missing.tar.gz")) == 1  # a 404 is not retried
    assert_clean_failure(out, cache)


def test_connection_refused_names_the_url(dirs):
    out, cache = dirs
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.tar.gz"
    with pytest.raises(DownloadError, match=rf"{url}: download failed after 2 attempt"):
        fetch("a", {"url": url, "sha256": "a" * 64}, out / "ds", cache, **{**FAST, "attempts": 2})
    assert_clean_failure(out, cache)


# --- spec validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"url": "https://x/a.tgz", "sha256": "a" * 64, "md5": "b"}, r"'cifar'.*unknown key.*md5"),
        ({"url": "https://x/a.tgz", "path": "/a.tgz"}, r"'cifar'.*exactly one of"),
        ({}, r"'cifar'.*exactly one of"),
        ({"url": "https://x/a.tgz"}, r"'cifar'.*needs its sha256"),
        ({"url": "https://x/a.tgz", "sha256": "abc"}, r"'cifar'.*64 hex"),
        ({"url": "gopher://x/a.tgz", "sha256": "a" * 64}, r"'cifar'.*must start with"),
        ({"url": "https://x/a.bin", "sha256": "a" * 64}, r"'cifar'.*cannot infer the format"),
        ({"url": "https://x/a.tgz", "sha256": "a" * 64, "format": "rar"}, r"unknown format 'rar'"),
        ({"url": "https://x/", "sha256": "a" * 64, "format": "file"}, r"set 'filename'"),
        ({"url": "https://x/a", "sha256": "a" * 64, "filename": "../a.zip"}, r"'\.\./a\.zip'"),
        ({"url": "https://x/a.tgz", "sha256": "a" * 64, "format": "dir"}, r"needs a local 'path'"),
    ],
)
def test_bad_specs(spec, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        fetch("cifar", spec, tmp_path / "ds", tmp_path / "cache")
    assert everything(tmp_path) == []


def test_check_spec_fills_in_defaults():
    entry = check_spec("x", {"url": "https://h/dl/Cifar%2010.TAR.GZ", "sha256": "A" * 64})
    assert entry["filename"] == "Cifar 10.TAR.GZ"
    assert entry["format"] == "tar.gz"
    assert entry["sha256"] == "a" * 64
