"""Readers for the released datasets the reference papers benchmark on.

Each source is `fn(params, inputs) -> iterator of (split, label, image)`,
where `inputs` maps the input roles declared in `INPUTS` to directories the
download stage produced (an extracted archive, or the folder holding a single
downloaded file). A source validates its parameters and inputs, and reads
enough to fail early (the pickles, the .mat, the list file, the folder
listing), before it yields anything. Image files are yielded as `Path`s so
that `write_dataset` copies them byte for byte; decoded releases (CIFAR, SVHN,
TinyImages) yield HxWx3 uint8 arrays.

The curation rules follow the papers' code:

- `cifar`: the python-pickle release; train = data_batch_1..5 (CIFAR-10) or
  `train` (CIFAR-100) in file order, test = test_batch / `test`. With
  `imbalance_ratio` rho, the train split keeps the first
  n_c = int(n_max * rho ** (c / (C - 1))) images of class c in file order
  (as the long-tailed OOD code does, without the LDAM shuffle); the kept
  images stay in file order. The test split is unchanged.
- `svhn`: the first `per_label` images of each digit of test_32x32.mat in
  file order (label 10 is digit 0), output in file order.
- `image_folder`: every image file under a folder, sorted by relative path;
  labels from sorted class-folder names, or 0.
- `image_list`: the files a list names (`path [label]` per line), in list order.
- `tinyimages_npy`: the rows of one N x H x W x 3 uint8 .npy file.

Only numpy and PIL are imported here; scipy is imported when an SVHN file is read.
"""

from __future__ import annotations

import ast
import copy
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

Record = tuple[str, int, np.ndarray | Path]
Inputs = Mapping[str, os.PathLike | str]
Source = Callable[[dict[str, Any], Inputs | None], Iterator[Record]]

SPLITS = ("train", "test")  # as ood.data.manifest.SPLITS (not imported: keep this module light)
# torchvision's IMG_EXTENSIONS; matched case-insensitively (ImageNet files end in .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar": {"variant": None, "imbalance_ratio": None},  # variant is required: 10 or 100
    "svhn": {"file": "test_32x32.mat", "per_label": 1000},
    "image_folder": {
        "subdir": "",
        "labels": "folders",
        "extensions": list(IMAGE_EXTENSIONS),
        "limit": None,
        "split": "test",
    },
    "image_list": {"list_file": None, "split": "test", "path_prefix": "", "label_key": "label"},
    "tinyimages_npy": {"file": "300K_random_images.npy", "limit": None},
}

INPUTS: dict[str, tuple[str, ...]] = {
    "cifar": ("archive",),
    "svhn": ("archive",),
    "image_folder": ("root",),
    "image_list": ("root", "list"),
    "tinyimages_npy": ("archive",),
}

# The sizes the papers state. An int is the whole dataset; a mapping gives split sizes.
STATED_SIZES: dict[str, int | dict[str, int]] = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "cifar10_lt": {"train": 12_406, "test": 10_000},
    "cifar100_lt": {"train": 10_847, "test": 10_000},
    "svhn": 10_000,
    "textures": 5_640,
    "places365": 10_000,
    "imagenet": {"train": 1_281_167, "test": 50_000},
    "imagenet_lt": {"train": 115_846, "test": 50_000},
    "inaturalist": 10_000,  # the MOS subsets
    "sun": 10_000,
    "places": 10_000,
    "tinyimages_300k": 300_000,
}


# --- parameters and inputs ----------------------------------------------------


def _resolve(source: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: params must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(DEFAULTS[source]))
    if unknown:
        allowed = ", ".join(DEFAULTS[source])
        raise ValueError(f"{source}: unknown param(s) {', '.join(unknown)}; allowed: {allowed}")
    return copy.deepcopy({**DEFAULTS[source], **params})


def _int(src: str, key: str, value: Any, *, optional: bool = False) -> int | None:
    """A positive int (bool is not one); None too where `optional`."""
    if value is None and optional:
        return None
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        kind = "a positive int or null" if optional else "a positive int"
        raise ValueError(f"{src}: param {key!r} must be {kind}, got {value!r}")
    return int(value)


def _choice(src: str, key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    # `value in allowed` alone would accept True for 1 and 10.0 for 10.
    if not any(type(value) is type(a) and value == a for a in allowed):
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{src}: param {key!r} must be one of {options}, got {value!r}")
    return value


def _relpath(src: str, key: str, value: Any, *, allow_empty: bool = False) -> str:
    """A relative forward-slash path that stays inside its base directory."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"{src}: param {key!r} must be a relative path string, got {value!r}")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if value.startswith("/") or "\\" in value or ".." in parts:
        raise ValueError(f"{src}: param {key!r} must be a relative path inside the input")
    return "/".join(parts)


def _inputs(src: str, inputs: Inputs | None) -> dict[str, Path]:
    """The input directories by role; exactly the roles `INPUTS[src]` declares."""
    given = dict(inputs or {})
    declared = INPUTS[src]
    missing = [role for role in declared if role not in given]
    unexpected = sorted(set(given) - set(declared))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing input(s) {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected input(s) {', '.join(map(str, unexpected))}")
        raise ValueError(f"{src}: {'; '.join(problems)}; expected: {', '.join(declared)}")
    dirs = {role: Path(given[role]) for role in declared}
    for role, path in dirs.items():
        if not path.is_dir():
            raise ValueError(f"{src}: input {role!r}: {path} is not a directory")
    return dirs


def _file_in(src: str, directory: Path, name: str, key: str = "file") -> Path:
    path = directory.joinpath(*_relpath(src, key, name).split("/"))
    if not path.is_file():
        raise FileNotFoundError(f"{src}: {path} not found (param {key!r} = {name!r})")
    return path


# --- CIFAR ----------------------------------------------------------------------

# folder in the tarball, train files, test file, label key
_CIFAR = {
    10: (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
    ),
    100: ("cifar-100-python", ("train",), "test", "fine_labels"),
}
# What the release's pickles (Python 2, numpy arrays) may reference, and nothing else:
# a downloaded pickle must not be able to run code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = _PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(*target)


def _cifar_batch(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`(images N x 32 x 32 x 3, labels)` of one pickled batch."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"cifar: {path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"cifar: {path}: expected a dict, got {type(batch).__name__}")

    def get(key: str) -> Any:
        for candidate in (key.encode(), key):  # bytes keys in the release, str if re-pickled
            if candidate in batch:
                return batch[candidate]
        keys = ", ".join(sorted(map(repr, batch)))
        raise ValueError(f"cifar: {path}: no key {key.encode()!r} (keys: {keys})")

    data = get("data")
    labels = np.asarray(get(label_key))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"cifar: {path}: b'data' must be an N x 3072 uint8 array")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"cifar: {path}: b'data' {data.shape} and {label_key} {labels.shape} do not match"
        )
    if labels.size and (
        labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes
    ):
        raise ValueError(f"cifar: {path}: labels must be integers in 0..{classes - 1}")
    # Channel-major rows (3 x 32 x 32) -> H x W x 3 views.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def long_tail_counts(n_max: float, classes: int, ratio: float) -> list[int]:
    """n_c = int(n_max * ratio ** (c / (C - 1))), the long-tailed CIFAR rule."""
    return [int(n_max * ratio ** (c / (classes - 1.0))) for c in range(classes)]


def cifar(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """CIFAR-10/100 train + test from the python release; long-tailed train with a ratio."""
    src = "cifar"
    p = _resolve(src, params)
    variant = _choice(src, "variant", p["variant"], (10, 100))
    ratio = p["imbalance_ratio"]
    if ratio is not None and (
        not isinstance(ratio, Real) or isinstance(ratio, bool) or not 0 < ratio <= 1
    ):
        raise ValueError(f"{src}: param 'imbalance_ratio' must be null or in (0, 1], got {ratio!r}")
    archive = _inputs(src, inputs)["archive"]
    folder_name, train_files, test_file, label_key = _CIFAR[variant]
    folder = archive / folder_name
    if not folder.is_dir() and (archive / test_file).is_file():
        folder = archive  # the input is the batches folder itself
    for name in (*train_files, test_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{src}: {folder / name} not found (is {archive} the extracted "
                f"CIFAR-{variant} python release, with {folder_name}/?)"
            )

    batches = [_cifar_batch(folder / name, label_key, variant) for name in train_files]
    train_images = np.concatenate([images for images, _ in batches])
    train_labels = np.concatenate([labels for _, labels in batches])
    test_images, test_labels = _cifar_batch(folder / test_file, label_key, variant)
    keep = np.ones(len(train_labels), dtype=bool)
    if ratio is not None:
        counts = np.bincount(train_labels, minlength=variant)
        if len(train_labels) % variant or (counts != len(train_labels) // variant).any():
            raise ValueError(
                f"{src}: the long-tail rule needs a balanced train split; "
                f"class counts are {counts.tolist()}"
            )
        keep[:] = False
        targets = long_tail_counts(len(train_labels) / variant, variant, float(ratio))
        for label, n in enumerate(targets):
            keep[np.flatnonzero(train_labels == label)[:n]] = True

    def generate() -> Iterator[Record]:
        for i in np.flatnonzero(keep):
            yield "train", int(train_labels[i]), train_images[i]
        for image, label in zip(test_images, test_labels, strict=True):
            yield "test", int(label), image

    return generate()


# --- SVHN -----------------------------------------------------------------------


def svhn(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """The first `per_label` images of each digit of an SVHN .mat file, in file order."""
    src = "svhn"
    p = _resolve(src, params)
    per_label = _int(src, "per_label", p["per_label"], optional=True)
    path = _file_in(src, _inputs(src, inputs)["archive"], p["file"])
    import scipy.io  # lazy: scipy is slow to import

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise ValueError(f"{src}: {path}: not a readable .mat file ({exc})") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{src}: {path}: needs variables X and y, has {sorted(mat)}")
    x, y = mat["X"], np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] == 0:
        raise ValueError(f"{src}: {path}: X must be H x W x 3 x N uint8, got {x.dtype} {x.shape}")
    if y.shape not in ((x.shape[3], 1), (x.shape[3],)) or y.dtype.kind not in "iuf":
        raise ValueError(f"{src}: {path}: y must be N x 1 with N = {x.shape[3]}, got {y.shape}")
    labels = y.reshape(-1).astype(np.int64)
    if not np.array_equal(labels, y.reshape(-1)) or labels.min() < 1 or labels.max() > 10:
        raise ValueError(f"{src}: {path}: y must hold the labels 1..10 (10 is digit 0)")
    labels[labels == 10] = 0
    chosen = []
    for digit in range(10):
        where = np.flatnonzero(labels == digit)[:per_label]
        if per_label is not None and len(where) < per_label:
            raise ValueError(
                f"{src}: {path}: digit {digit} has {len(where)} images, fewer than "
                f"per_label = {per_label}"
            )
        chosen.append(where)
    order = np.sort(np.concatenate(chosen))

    def generate() -> Iterator[Record]:
        for i in order:
            yield "test", int(labels[i]), x[:, :, :, i]

    return generate()


# --- image folders and lists ----------------------------------------------------


def _image_files(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under `directory`, recursively, sorted by relative path.

    Hidden files and folders (a leading dot, e.g. macOS `._x.jpg` resource forks
    in tarballs) are skipped.
    """
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(parent, name))
    return sorted(found, key=lambda path: path.relative_to(directory).parts)


def image_folder(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """Image files of a folder: `labels: folders` (index of the sorted class folder) or `none`.

    With `folders`, files directly in the folder (outside class folders) are
    ignored, as torchvision's ImageFolder does; `limit` keeps the first files
    of the whole sorted listing.
    """
    src = "image_folder"
    p = _resolve(src, params)
    subdir = _relpath(src, "subdir", p["subdir"], allow_empty=True)
    labels = _choice(src, "labels", p["labels"], ("folders", "none"))
    split = _choice(src, "split", p["split"], SPLITS)
    limit = _int(src, "limit", p["limit"], optional=True)
    extensions = p["extensions"]
    if (
        isinstance(extensions, str)
        or not isinstance(extensions, list | tuple)
        or not extensions
        or not all(isinstance(e, str) and len(e) > 1 and e.startswith(".") for e in extensions)
    ):
        raise ValueError(
            f"{src}: param 'extensions' must be a non-empty list like ['.jpg', '.png'], "
            f"got {extensions!r}"
        )
    extensions = tuple(e.lower() for e in extensions)
    root = _inputs(src, inputs)["root"]
    base = root.joinpath(*subdir.split("/")) if subdir else root
    if not base.is_dir():
        raise FileNotFoundError(f"{src}: {base} is not a directory (param 'subdir' = {subdir!r})")

    files: list[tuple[int, Path]] = []
    if labels == "folders":
        classes = sorted(e.name for e in os.scandir(base) if e.is_dir() and e.name[0] != ".")
        if not classes:
            raise ValueError(f"{src}: {base} has no class folders (labels: folders)")
        for label, name in enumerate(classes):
            in_class = _image_files(base / name, extensions)
            if not in_class:
                raise ValueError(f"{src}: class folder {base / name} has no image files")
            files.extend((label, path) for path in in_class)
    else:
        files = [(0, path) for path in _image_files(base, extensions)]
    if not files:
        raise ValueError(f"{src}: no image files ({', '.join(extensions)}) under {base}")
    files = files[:limit]

    def generate() -> Iterator[Record]:
        for label, path in files:
            yield split, label, path

    return generate()


def _parse_label(rest: str, label_key: str) -> int:
    """The label of a list line: nothing (0), an int, or a dict literal with `label_key`."""
    if not rest:
        return 0
    if rest.startswith("{"):  # SCOOD lists: `path {"label": ..., "sc_label": ...}`
        extras = ast.literal_eval(rest)  # literals only: no code runs
        if not isinstance(extras, dict) or label_key not in extras:
            raise ValueError(f"no {label_key!r} in {rest!r}")
        value = extras[label_key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"label {value!r} is not an integer")
        return value
    return int(rest)  # a single integer token, nothing else


def image_list(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """The files a list names under `root`, in list order.

    Each line is `relative/path [label]`: no label means 0, and a dict literal
    (SCOOD) gives the label under `label_key`. `path_prefix` is removed from
    paths that start with it. Blank lines are skipped; a malformed line, a
    path outside `root` or a missing file is an error naming the list and line.
    """
    src = "image_list"
    p = _resolve(src, params)
    if p["list_file"] is None:
        raise ValueError(f"{src}: param 'list_file' is required (a file in the 'list' input)")
    split = _choice(src, "split", p["split"], SPLITS)
    prefix = p["path_prefix"]
    if prefix is None:
        prefix = ""
    if not isinstance(prefix, str):
        raise ValueError(f"{src}: param 'path_prefix' must be a string, got {prefix!r}")
    label_key = p["label_key"]
    if not isinstance(label_key, str) or not label_key:
        raise ValueError(f"{src}: param 'label_key' must be a non-empty string")
    dirs = _inputs(src, inputs)
    root = dirs["root"]
    list_path = _file_in(src, dirs["list"], p["list_file"], key="list_file")
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{src}: {list_path}: not UTF-8 text ({exc})") from None

    records: list[tuple[int, Path]] = []
    for number, line in enumerate(lines, start=1):
        where = f"{src}: {list_path}:{number}"
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        rel = fields[0]
        if prefix and rel.startswith(prefix):
            rel = rel[len(prefix) :]
        try:
            label = _parse_label(fields[1].strip() if len(fields) > 1 else "", label_key)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as exc:
            raise ValueError(f"{where}: malformed line {line!r} ({exc})") from None
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or ".." in parts:
            raise ValueError(f"{where}: path {rel!r} is not a relative path inside the root")
        file = root.joinpath(*(part for part in parts if part not in ("", ".")))
        if not file.is_file():
            raise FileNotFoundError(f"{where}: {rel} not found under {root}")
        records.append((label, file))
    if not records:
        raise ValueError(f"{src}: {list_path} lists no files")

    def generate() -> Iterator[Record]:
        for label, file in records:
            yield split, label, file

    return generate()


# --- TinyImages -----------------------------------------------------------------


def tinyimages_npy(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """The first `limit` (default all) images of an N x H x W x 3 uint8 .npy, split train."""
    src = "tinyimages_npy"
    p = _resolve(src, params)
    limit = _int(src, "limit", p["limit"], optional=True)
    path = _file_in(src, _inputs(src, inputs)["archive"], p["file"])
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{src}: {path}: not a readable .npy array ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        raise ValueError(
            f"{src}: {path}: expected N x H x W x 3 uint8, got {data.dtype} {data.shape}"
        )
    count = len(data) if limit is None else min(limit, len(data))

    def generate() -> Iterator[Record]:
        for i in range(count):
            yield "train", 0, np.asarray(data[i])

    return generate()


def per_split(source: Source, key: str) -> Source:
    """Let `key` be a mapping {split: value}: one dataset with a train and a test split
    (ImageNet: subdir {train: train, test: val}; ImageNet-LT: one list file per split)."""

    def run(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
        value = (params or {}).get(key)
        if not isinstance(value, Mapping):
            return source(params, inputs)
        unknown = sorted(set(value) - set(SPLITS))
        if unknown or not value:
            raise ValueError(
                f"{source.__name__}: param {key!r} maps splits ({', '.join(SPLITS)}) to values, "
                f"got {sorted(value)}"
            )
        # Resolve each split's records now, so a bad split fails before anything is written.
        parts = [
            source({**params, key: value[s], "split": s}, inputs) for s in SPLITS if s in value
        ]
        return (record for part in parts for record in part)

    run.__name__ = source.__name__
    run.__doc__ = source.__doc__
    return run


SOURCES: dict[str, Source] = {
    "cifar": cifar,
    "svhn": svhn,
    "image_folder": per_split(image_folder, "subdir"),
    "image_list": per_split(image_list, "list_file"),
    "tinyimages_npy": tinyimages_npy,
}
