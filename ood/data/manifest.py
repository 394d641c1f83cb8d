"""The curated-dataset contract: image files (PNG, or kept as released) plus `manifest.csv`.

A dataset directory holds image files (any relative layout; `write_dataset`
uses `images/<split>/<label>/<NNNNN>.<ext>`: decoded images become PNG, image
files are kept byte for byte with their extension) and `manifest.csv` with header
`index,path,label,split,sha256`: `index` is the row position (0..N-1) and is
what feature dumps refer to, `path` is relative with forward slashes, and
`sha256` is that of the file bytes. The manifest is written last, so its
presence marks a complete dataset, and its sha256 identifies the dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import operator
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ood.io import atomic_dir, sha256_file, write_text_atomic

MANIFEST_NAME = "manifest.csv"
COLUMNS = ("index", "path", "label", "split", "sha256")
SPLITS = ("train", "test")
PNG_COMPRESS_LEVEL = 6  # fixed so the same pixels always give the same bytes
# Encoded files a record may name (PIL's format names; MPO is a multi-picture JPEG).
FILE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}")


class DatasetError(ValueError):
    """A curated dataset is missing, malformed, or does not match its manifest."""


class ManifestRow(NamedTuple):
    index: int
    path: str  # relative to the dataset directory, forward slashes
    label: int
    split: str
    sha256: str


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A fresh RGB image: going through numpy drops any info (ICC, text) PIL would save."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DatasetError(f"expected an HxWx3 uint8 image, got {array.dtype} {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Atomic write, then the umask's mode: the temp file it comes from is 0600."""
    write_text_atomic(path, text)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _place_file(source: Path, dest: Path) -> str:
    """Hard-link (or else copy) an encoded image file to `dest`; return its sha256.

    Only the header is read to check the format: decoding every file of a
    large set (ImageNet) would cost more than the whole curation.
    """
    try:
        with Image.open(source) as image:
            kind = image.format
    except FileNotFoundError:
        raise DatasetError(f"{source}: image file not found") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{source}: not a readable image ({exc})") from None
    if kind not in FILE_FORMATS:
        raise DatasetError(f"{source}: format {kind} not in {', '.join(sorted(FILE_FORMATS))}")
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed: copy the bytes
        shutil.copyfile(source, dest)
    with open(dest, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_dataset(
    out_dir: str | os.PathLike,
    records: Iterable[tuple[str, int, Image.Image | np.ndarray | os.PathLike]],
    overwrite: bool = True,
    *,
    info: str | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write `(split, label, image)` records as a curated dataset; return the manifest path.

    `image` is an HxWx3 uint8 array or PIL image (written as PNG), or the
    path of an encoded image file (JPEG, PNG, ...: see `FILE_FORMATS`), which
    is hard-linked or copied byte for byte and keeps its extension. Images
    may differ in size (`load_images` needs one size; other readers may not).

    Everything is built in a hidden sibling `.<name>.partial-*` directory and
    renamed onto `out_dir` only when complete, so an error or Ctrl-C leaves
    any older `out_dir` untouched and no temporary directory behind. `info`,
    if given, is written to `dataset.json` (e.g. the source and its parameters);
    `extra` maps further file names to their text (e.g. a per-row side table).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: dataset already exists (overwrite=False)")
    with atomic_dir(out_dir) as tmp:
        rows: list[ManifestRow] = []
        total = len(records) if hasattr(records, "__len__") else None
        # `delay` keeps small datasets quiet; long curations show a bar in the log.
        progress = tqdm(
            records, total=total, desc=out_dir.name, unit="img", file=sys.stderr, delay=2.0
        )
        for split, label, image in progress:
            if split not in SPLITS:
                raise DatasetError(f"record {len(rows)}: split {split!r} not in {SPLITS}")
            label = operator.index(label)
            stem = f"images/{split}/{label}/{len(rows):05d}"
            (tmp / stem).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(image, str | os.PathLike):
                source = Path(image)
                if not _EXTENSION.fullmatch(source.suffix):
                    raise DatasetError(
                        f"record {len(rows)}: {source}: needs a plain file extension like .jpg"
                    )
                rel = stem + source.suffix
                digest = _place_file(source, tmp / rel)
            else:
                data = _png_bytes(_to_rgb(image))
                rel = stem + ".png"
                (tmp / rel).write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
            rows.append(ManifestRow(len(rows), rel, label, split, digest))
        if not rows:
            raise DatasetError(f"{out_dir}: no images to write")
        if info is not None:
            _write_text(tmp / "dataset.json", info)
        for name, content in (extra or {}).items():
            _write_text(tmp / name, content)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        _write_text(tmp / MANIFEST_NAME, text.getvalue())  # last: the commit marker
    return out_dir / MANIFEST_NAME


def _manifest_path(dataset_dir: str | os.PathLike) -> Path:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found (dataset not curated?)")
    return path


def _parse_row(fields: list[str], position: int, where: str) -> ManifestRow:
    if len(fields) != len(COLUMNS):
        raise DatasetError(f"{where}: expected {len(COLUMNS)} fields, got {len(fields)}")
    index, path, label, split, digest = fields
    try:
        index_value, label_value = int(index), int(label)
    except ValueError as exc:
        raise DatasetError(f"{where}: index and label must be integers ({exc})") from None
    if index_value != position:
        raise DatasetError(f"{where}: index {index_value} != row position {position}")
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or ".." in parts or "" in parts:
        raise DatasetError(f"{where}: path {path!r} is not a relative forward-slash path")
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} not in {SPLITS}")
    if not _SHA256.fullmatch(digest):
        raise DatasetError(f"{where}: sha256 {digest!r} is not 64 lowercase hex digits")
    return ManifestRow(index_value, path, label_value, split, digest)


def read_manifest(dataset_dir: str | os.PathLike) -> list[ManifestRow]:
    """The manifest rows in order; errors name the manifest file and line."""
    path = _manifest_path(dataset_dir)
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise DatasetError(f"{path}: header must be {','.join(COLUMNS)}, got {header}")
        rows = [_parse_row(fields, i, f"{path}:{i + 2}") for i, fields in enumerate(reader)]
    seen: set[str] = set()
    for row in rows:
        if row.path in seen:
            raise DatasetError(f"{path}:{row.index + 2}: duplicate path {row.path!r}")
        seen.add(row.path)
    return rows


def manifest_sha256(dataset_dir: str | os.PathLike) -> str:
    """The dataset's identity, recorded in feature dumps for provenance."""
    return sha256_file(_manifest_path(dataset_dir))


def select_rows(dataset_dir: str | os.PathLike, split: str | None = None) -> list[ManifestRow]:
    """The manifest rows of one split (all if None); an error if there are none."""
    dataset_dir = Path(dataset_dir)
    rows = read_manifest(dataset_dir)
    if split is not None:
        if split not in SPLITS:
            raise DatasetError(f"{dataset_dir}: unknown split {split!r}; allowed: {SPLITS}")
        rows = [row for row in rows if row.split == split]
    if not rows:
        what = f"split {split!r}" if split is not None else "any split"
        raise DatasetError(f"{dataset_dir}: no images in {what}")
    return rows


def row_file(dataset_dir: str | os.PathLike, row: ManifestRow) -> Path:
    """The image file of a manifest row (paths in the manifest use '/')."""
    return Path(dataset_dir).joinpath(*row.path.split("/"))


def read_row(dataset_dir: str | os.PathLike, row: ManifestRow, verify: bool = True) -> bytes:
    """The bytes of a row's image; `verify` checks them against the manifest's sha256."""
    file = row_file(dataset_dir, row)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{file}: listed in the manifest but missing") from None
    if verify and hashlib.sha256(data).hexdigest() != row.sha256:
        raise DatasetError(f"{file}: sha256 does not match the manifest (file modified?)")
    return data


def load_images(
    dataset_dir: str | os.PathLike, split: str | None = None, verify: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(images N x H x W x 3 uint8, labels int64, index int64)` in manifest order.

    `split` restricts to one split; `verify` checks every file's sha256.
    """
    dataset_dir = Path(dataset_dir)
    rows = select_rows(dataset_dir, split)
    images: np.ndarray | None = None
    for i, row in enumerate(rows):
        file = row_file(dataset_dir, row)
        with Image.open(io.BytesIO(read_row(dataset_dir, row, verify))) as image:
            array = np.asarray(image.convert("RGB"))
        if images is None:
            images = np.empty((len(rows), *array.shape), dtype=np.uint8)
        elif array.shape != images.shape[1:]:
            raise DatasetError(
                f"{file}: size {array.shape[:2]} differs from the dataset's {images.shape[1:3]}"
                " (images of several sizes are read with the training setting images: stream)"
            )
        images[i] = array
    labels = np.array([row.label for row in rows], dtype=np.int64)
    index = np.array([row.index for row in rows], dtype=np.int64)
    return images, labels, index


def load_image_size(dataset_dir: str | os.PathLike) -> tuple[int, int]:
    """`(height, width)` of a dataset's first image (`load_images` needs one size for all)."""
    dataset_dir = Path(dataset_dir)
    rows = read_manifest(dataset_dir)
    if not rows:
        raise DatasetError(f"{dataset_dir}: the manifest lists no images")
    with Image.open(row_file(dataset_dir, rows[0])) as image:
        return image.height, image.width
