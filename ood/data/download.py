"""Fetch one download entry of the config into a directory, verified and atomic.

A download entry names either a `url` (http, https, ftp or file) with its
`sha256`, or a local `path` (licensed data such as ImageNet; the sha256 is
optional there and checked when given). `fetch` builds `dest`:

- `format: file`: `dest/<filename>` is the file itself;
- `tar`, `tar.gz`, `tgz`, `zip`: the archive's members, extracted safely
  (no absolute names, no `..`, no links leading outside, no device files);
- `dir` (path sources only): `dest/<filename>` is a symlink to the folder,
  used as it is;

plus `dest/.fetch.json` recording where the bytes came from and their sha256.

URLs go through pooch, which checks the sha256 and keeps the verified file in
`<cache_dir>/<name>/<filename>`, so a rerun downloads nothing. The HTTP
downloader given to pooch resumes an interrupted transfer from
`<cache_dir>/<name>/<filename>.part` with a `Range` request. `dest` is built
in a hidden sibling directory and renamed into place: on any error `dest` is
left as it was (absent, or the older complete copy) and no temporary file
remains.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pooch
import requests
import urllib3

from ood.io import atomic_dir, sha256_file

log = logging.getLogger(__name__)

SPEC_KEYS = ("url", "path", "sha256", "format", "filename")
FORMATS = ("file", "tar", "tar.gz", "tgz", "zip", "dir")
URL_SCHEMES = ("http", "https", "ftp", "file")
METADATA_FILE = ".fetch.json"
ATTEMPTS = 3  # tries per download (network errors, 5xx replies, truncated transfers)
BACKOFF_S = 1.0  # wait before try k+1: BACKOFF_S * 2**(k-1)
TIMEOUT_S = 60.0  # connect and read timeout of one HTTP request
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
# HTTP statuses worth another try; any other 4xx fails at once.
_RETRY_STATUS = {408, 425, 429}
_UMASK = os.umask(0)
os.umask(_UMASK)


class DownloadError(ValueError):
    """A download or extraction failed; the message names the file or URL."""


class _TransferError(OSError):
    """A transfer ended early; another attempt resumes it."""


class _UnsafeMember(Exception):
    def __init__(self, member: str, reason: str):
        super().__init__(f"{member!r}: {reason}")
        self.member = member
        self.reason = reason


def fetch(
    name: str,
    spec: dict[str, Any],
    dest: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF_S,
    timeout: float = TIMEOUT_S,
    progressbar: bool | None = None,
) -> Path:
    """Build directory `dest` from download entry `name`; return `dest`.

    `attempts`, `backoff` (seconds, doubled after each failed try) and
    `timeout` (seconds per HTTP request) bound the retries. `progressbar`:
    True or False forces the tqdm bar on stderr on or off; None shows it on
    a terminal only.
    """
    entry = check_spec(name, spec)
    dest = Path(dest)
    if "url" in entry:
        source = _retrieve(
            name,
            entry,
            Path(cache_dir),
            attempts=attempts,
            backoff=backoff,
            timeout=timeout,
            progressbar=progressbar,
        )
        record = {"name": name, "url": entry["url"], "sha256": entry["sha256"]}
    else:
        source = _local_source(name, entry)
        record = {"name": name, "path": str(source), "sha256": entry.get("sha256")}
    record |= {"format": entry["format"], "filename": entry["filename"]}
    _materialise(source, entry, dest, record)
    what = entry.get("url") or str(source)
    sha = f"sha256 {record['sha256'][:12]}" if record["sha256"] else "folder"
    log.info("fetched %s: %s (%s, %s) -> %s", name, what, entry["format"], sha, dest)
    return dest


def check_spec(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Validate one download entry; return it with `format` and `filename` filled in."""
    where = f"download {name!r}"
    if not isinstance(spec, dict):
        raise DownloadError(f"{where}: spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise DownloadError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}"
        )
    if not name or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise DownloadError(f"{where}: the name must be letters, digits, '_', '-' or '.'")
    if ("url" in spec) == ("path" in spec):
        raise DownloadError(f"{where}: give exactly one of 'url' or 'path'")
    entry = dict(spec)
    sha = entry.get("sha256")
    if sha is not None:
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise DownloadError(f"{where}: sha256 must be 64 hex digits, got {sha!r}")
        entry["sha256"] = sha.lower()
    if "url" in entry:
        url = entry["url"]
        scheme = urlsplit(url).scheme if isinstance(url, str) else ""
        if scheme not in URL_SCHEMES:
            raise DownloadError(
                f"{where}: url {url!r} must start with one of "
                + ", ".join(f"{s}://" for s in URL_SCHEMES)
            )
        if sha is None:
            raise DownloadError(f"{where}: a url needs its sha256")
        default_name = unquote(PurePosixPath(urlsplit(url).path).name)
    else:
        if not isinstance(entry["path"], str) or not entry["path"]:
            raise DownloadError(f"{where}: path must be a non-empty string")
        default_name = Path(entry["path"]).expanduser().name
    filename = entry.get("filename") or default_name
    if (
        not isinstance(filename, str)
        or filename in ("", ".", "..", METADATA_FILE)
        or "/" in filename
        or "\\" in filename
    ):
        raise DownloadError(
            f"{where}: cannot use {filename!r} as a file name; set 'filename' to a plain name"
        )
    entry["filename"] = filename
    fmt = entry.get("format") or _infer_format(filename)
    if fmt is None:
        raise DownloadError(
            f"{where}: cannot infer the format of {filename!r}; "
            f"set 'format' to one of {', '.join(FORMATS)}"
        )
    if fmt not in FORMATS:
        raise DownloadError(f"{where}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "dir" and "path" not in entry:
        raise DownloadError(f"{where}: format 'dir' needs a local 'path', not a url")
    entry["format"] = fmt
    return entry


def _infer_format(filename: str) -> str | None:
    lower = filename.lower()
    for suffix, fmt in ((".tar.gz", "tar.gz"), (".tgz", "tgz"), (".tar", "tar"), (".zip", "zip")):
        if lower.endswith(suffix):
            return fmt
    return None


# --- local sources ----------------------------------------------------------------------------


def _local_source(name: str, entry: dict[str, Any]) -> Path:
    path = Path(entry["path"]).expanduser().absolute()
    where = f"download {name!r}: {path}"
    if entry["format"] == "dir":
        if not path.is_dir():
            raise DownloadError(f"{where}: no such folder")
        if entry.get("sha256"):
            raise DownloadError(f"{where}: a folder has no sha256; drop the key")
        return path
    if not path.is_file():
        raise DownloadError(f"{where}: no such file")
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise DownloadError(f"{where}: cannot read ({exc})") from exc
    expected = entry.get("sha256")
    if expected and actual != expected:
        raise DownloadError(f"{where}: sha256 mismatch: expected {expected}, got {actual}")
    entry["sha256"] = actual
    return path


# --- downloads --------------------------------------------------------------------------------


def _retrieve(
    name: str,
    entry: dict[str, Any],
    cache_dir: Path,
    *,
    attempts: int,
    backoff: float,
    timeout: float,
    progressbar: bool | None,
) -> Path:
    """Download `entry["url"]` into the cache through pooch (hash-checked); return the file."""
    url, sha, filename = entry["url"], entry["sha256"], entry["filename"]
    attempts = max(1, attempts)
    cache = cache_dir / name
    target = cache / filename
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        downloader: Any = ResumableHTTPDownloader(
            cache / f"{filename}.part", timeout=timeout, progressbar=progressbar
        )
    elif scheme == "file":
        downloader = _FileDownloader()
    else:
        downloader = _HashingDownloader(
            pooch.FTPDownloader(timeout=timeout, progressbar=bool(progressbar))
        )
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        downloader.resumed = False
        try:
            found = pooch.retrieve(
                url, known_hash=f"sha256:{sha}", fname=filename, path=cache, downloader=downloader
            )
            return Path(found)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            reason = exc.response.reason if exc.response is not None else ""
            message = f"{url}: HTTP {status} {reason}".rstrip()
            if status is None or (status < 500 and status not in _RETRY_STATUS):
                raise DownloadError(message) from exc
            last = DownloadError(message)
        except (requests.RequestException, _TransferError, EOFError) as exc:
            last = exc
        except ftplib.Error as exc:  # pooch's FTP downloader: a refused login, a missing file
            raise DownloadError(f"{url}: {exc}") from exc
        except ValueError as exc:  # pooch: the sha256 of the download does not match
            target.unlink(missing_ok=True)  # a stale cached copy, if pooch was updating one
            if not downloader.resumed or attempt == attempts:
                got = f"got {downloader.sha256}" if downloader.sha256 else f"pooch says: {exc}"
                raise DownloadError(
                    f"{url}: sha256 mismatch: expected {sha}, {got}; the download was deleted "
                    "(a changed file upstream, or an outdated sha256 in the config)"
                ) from exc
            last = exc  # a resumed transfer may have joined stale bytes: try again from zero
        except OSError as exc:
            if scheme == "file" or attempt == attempts:
                raise DownloadError(f"{url}: {exc}") from exc
            last = exc
        if attempt < attempts:
            wait = backoff * 2 ** (attempt - 1)
            log.warning(
                "%s: attempt %d of %d failed (%s); retrying in %.1f s",
                url,
                attempt,
                attempts,
                last,
                wait,
            )
            time.sleep(wait)
    raise DownloadError(f"{url}: download failed after {attempts} attempt(s): {last}") from last


class ResumableHTTPDownloader:
    """A pooch downloader that continues an interrupted HTTP(S) transfer.

    Bytes go to `part`; when `part` already holds N bytes the request asks for
    `Range: bytes=N-` and appends a 206 reply (a 200 reply starts over). Only a
    transfer whose length matches the announced one is moved onto pooch's
    `output_file`; an incomplete one raises and keeps `part` for the next try.
    """

    def __init__(self, part: Path, timeout: float = TIMEOUT_S, progressbar: bool | None = None):
        self.part = Path(part)
        self.timeout = timeout
        self.progressbar = progressbar
        self.resumed = False  # this transfer appended to earlier bytes
        self.sha256: str | None = None  # of the last complete transfer

    def __call__(self, url: str, output_file: Any, pooch_obj: Any, check_only: bool = False):
        if check_only:
            reply = requests.head(url, allow_redirects=True, timeout=self.timeout)
            return reply.status_code == 200
        self.sha256 = None
        self.part.parent.mkdir(parents=True, exist_ok=True)
        digest = self._transfer(url)
        self.sha256 = digest
        if hasattr(output_file, "write"):
            with open(self.part, "rb") as handle:
                shutil.copyfileobj(handle, output_file, CHUNK)
            self.part.unlink()
        else:
            os.replace(self.part, output_file)
        return None

    def _transfer(self, url: str, allow_restart: bool = True) -> str:
        offset = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as reply:
            if reply.status_code == 416 and offset:
                match = re.match(
                    r"^\s*bytes\s+\*/(\d+)\s*$", reply.headers.get("Content-Range", "")
                )
                if match and int(match.group(1)) == offset:  # the partial file is complete
                    self.resumed = True
                    return sha256_file(self.part)
                if allow_restart:  # longer than the resource: start over
                    self.part.unlink()
                    return self._transfer(url, allow_restart=False)
            reply.raise_for_status()
            length = _int_header(reply.headers.get("Content-Length"))
            start = 0
            if reply.status_code == 206:
                start = _content_range_start(reply.headers.get("Content-Range"))
                if start is None or start > offset:
                    raise _TransferError(
                        f"unusable Content-Range {reply.headers.get('Content-Range')!r} "
                        f"for a request from byte {offset}"
                    )
            total = start + length if length is not None else None
            digest = hashlib.sha256()
            if start:
                self.resumed = True
                with open(self.part, "r+b") as handle:
                    handle.truncate(start)
                    while block := handle.read(CHUNK):
                        digest.update(block)
                log.info("%s: resuming from byte %d", url, start)
            # The raw bytes as sent (no Content-Encoding decoding: the sha256 is of the file),
            # read as they arrive, so that a dropped connection keeps all it delivered.
            raw = reply.raw
            read = getattr(raw, "read1", None) or raw.read
            size = start
            with (
                open(self.part, "ab" if start else "wb") as handle,
                _progress(total, start, self.part.name, self.progressbar) as bar,
            ):
                while True:
                    try:
                        block = read(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        of = f" of {total}" if total is not None else ""
                        raise _TransferError(f"transfer ended at byte {size}{of} ({exc})") from exc
                    if not block:
                        break
                    handle.write(block)
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
                handle.flush()
                os.fsync(handle.fileno())
        if total is not None and size != total:
            raise _TransferError(f"transfer ended at byte {size} of {total}")
        return digest.hexdigest()


class _FileDownloader:
    """A pooch downloader for file:// URLs (pooch has none): copy and hash."""

    resumed = False
    sha256: str | None = None

    def __call__(self, url: str, output_file: Any, pooch_obj: Any, check_only: bool = False):
        parts = urlsplit(url)
        source = Path(url2pathname(unquote(parts.path)))
        if parts.netloc not in ("", "localhost"):
            raise OSError(f"file URL with a remote host {parts.netloc!r} is not supported")
        if check_only:
            return source.is_file()
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(output_file, "wb") as out:
            while block := src.read(CHUNK):
                out.write(block)
                digest.update(block)
        self.sha256 = digest.hexdigest()
        return None


class _HashingDownloader:
    """Wrap one of pooch's own downloaders (FTP) and note the sha256 of what it wrote."""

    resumed = False
    sha256: str | None = None

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, url: str, output_file: Any, pooch_obj: Any, check_only: bool = False):
        result = self.inner(url, output_file, pooch_obj, check_only=check_only)
        if not check_only and isinstance(output_file, str | os.PathLike):
            self.sha256 = sha256_file(output_file)
        return result


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


def _progress(total: int | None, initial: int, label: str, progressbar: bool | None):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progressbar is None else not progressbar,
        leave=False,
    )


# --- building dest ----------------------------------------------------------------------------


def _materialise(source: Path, entry: dict[str, Any], dest: Path, record: dict) -> None:
    """Fill a hidden sibling of `dest` and swap it in (see ood.io.atomic_dir)."""
    with atomic_dir(dest) as tmp:
        fmt = entry["format"]
        if fmt == "file":
            _link_or_copy(source, tmp / entry["filename"])
        elif fmt == "dir":
            os.symlink(source, tmp / entry["filename"], target_is_directory=True)
        elif fmt == "zip":
            _extract_zip(source, tmp)
        else:
            _extract_tar(source, tmp, fmt)
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no second copy of a large file
    except OSError:
        shutil.copyfile(source, target)


def _check_member_name(name: str) -> None:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise _UnsafeMember(name, "absolute path")
    if ".." in posix.parts:
        raise _UnsafeMember(name, "path leads outside the archive's folder ('..')")


def _safe_tar_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    # The "data" filter would quietly strip a leading "/"; refuse such archives outright.
    _check_member_name(member.name)
    return tarfile.data_filter(member, path)


def _extract_tar(archive: Path, target: Path, fmt: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:  # any compression, whatever the format says
            tar.extractall(target, filter=_safe_tar_filter)
    except _UnsafeMember as exc:
        raise DownloadError(f"{archive}: unsafe member {exc.member!r}: {exc.reason}") from exc
    except tarfile.FilterError as exc:
        member = exc.tarinfo.name if exc.tarinfo is not None else "?"
        raise DownloadError(f"{archive}: unsafe member {member!r}: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DownloadError(f"{archive}: not a readable {fmt} archive ({exc})") from exc
    except OSError as exc:
        if exc.errno is not None:  # the disk (full, read-only, ...), not the archive
            raise
        # gzip.BadGzipFile, bz2 "Invalid data stream": damaged compressed data
        raise DownloadError(f"{archive}: not a readable {fmt} archive ({exc})") from exc


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            root = target.resolve()
            for info in zf.infolist():
                _check_member_name(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _UnsafeMember(info.filename, "symbolic links are not extracted")
                resolved = (root / info.filename).resolve()
                if resolved != root and not resolved.is_relative_to(root):
                    raise _UnsafeMember(info.filename, "path leads outside the archive's folder")
            zf.extractall(target)
    except _UnsafeMember as exc:
        raise DownloadError(f"{archive}: unsafe member {exc.member!r}: {exc.reason}") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
        raise DownloadError(f"{archive}: not a readable zip archive ({exc})") from exc
    except NotImplementedError as exc:  # an unsupported compression method
        raise DownloadError(f"{archive}: cannot extract ({exc})") from exc
