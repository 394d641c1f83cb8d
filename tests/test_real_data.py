"""Real-dataset readers (ood.data.real) on generated files in the releases' formats."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ood.data.curate import curate, summarize
from ood.data.demo import DEFAULTS, INPUTS, SOURCES
from ood.data.manifest import DatasetError, load_images, read_manifest, write_dataset
from ood.data.real import STATED_SIZES, cifar, image_folder, image_list, long_tail_counts, svhn

CIFAR10_LT_TRAIN = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # sums to 12,406


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def markers(image: np.ndarray) -> int:
    """The index a generated CIFAR image carries in the red bytes of pixels (0, 0) and (0, 1)."""
    return int(image[0, 0, 0]) + 256 * int(image[0, 1, 0])


def marked_rows(n: int, offset: int = 0) -> np.ndarray:
    """n x 3072 uint8 rows, zero but for the index in the first two (red) bytes."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    index = np.arange(offset, offset + n)
    data[:, 0], data[:, 1] = index % 256, index // 256
    return data


def dump(path: Path, batch: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)  # as the release (Python 2 pickles)


def balanced_labels(classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory):
    """The extracted cifar-10-python.tar.gz: 5 x 10,000 train and 10,000 test images."""
    archive = tmp_path_factory.mktemp("cifar10")
    folder = archive / "cifar-10-batches-py"
    folder.mkdir()
    train_labels = balanced_labels(10, 5000, seed=0)
    for b in range(5):
        rows = slice(b * 10_000, (b + 1) * 10_000)
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": train_labels[rows].tolist(),
            b"data": marked_rows(10_000, offset=b * 10_000),
            b"filenames": [f"img_{i}.png".encode() for i in range(rows.start, rows.stop)],
        }
        dump(folder / f"data_batch_{b + 1}", batch)
    test_labels = balanced_labels(10, 1000, seed=1)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels.tolist(),
        b"data": marked_rows(10_000, offset=50_000),
        b"filenames": [f"test_{i}.png".encode() for i in range(10_000)],
    }
    dump(folder / "test_batch", batch)
    return archive, train_labels, test_labels


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory):
    """The extracted cifar-100-python.tar.gz: 500 train images per class, a small test file."""
    archive = tmp_path_factory.mktemp("cifar100")
    folder = archive / "cifar-100-python"
    folder.mkdir()
    for name, per_class, seed in (("train", 500, 2), ("test", 1, 3)):
        fine = balanced_labels(100, per_class, seed)
        batch = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": marked_rows(len(fine)),
        }
        dump(folder / name, batch)
    return archive, fine


def test_long_tail_counts():
    assert long_tail_counts(5000, 10, 0.01) == CIFAR10_LT_TRAIN
    assert sum(CIFAR10_LT_TRAIN) == 12_406
    counts = long_tail_counts(500, 100, 0.01)
    assert sum(counts) == 10_847 and counts[0] == 500 and counts[-1] == 5
    assert long_tail_counts(5000, 10, 1.0) == [5000] * 10


def test_cifar10_balanced(cifar10_archive):
    """All 60,000 images in file order (read from the source: writing them all would take
    10+ s; the long-tailed test below curates to disk through the same code)."""
    archive, train_labels, test_labels = cifar10_archive
    records = list(cifar({"variant": 10}, {"archive": archive}))
    assert Counter(split for split, _, _ in records) == {"train": 50_000, "test": 10_000}
    assert [label for _, label, _ in records] == [*train_labels.tolist(), *test_labels.tolist()]
    assert [markers(image) for _, _, image in records] == list(range(60_000))
    image = records[12_345][2]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_cifar10_long_tail_keeps_the_first_of_each_class(tmp_path, cifar10_archive):
    archive, train_labels, test_labels = cifar10_archive
    params = {"variant": 10, "imbalance_ratio": 0.01}
    records = list(cifar(params, {"archive": archive}))
    train = [(label, markers(image)) for split, label, image in records if split == "train"]
    assert len(train) == 12_406
    assert Counter(label for label, _ in train) == dict(enumerate(CIFAR10_LT_TRAIN))
    kept = [marker for _, marker in train]
    assert kept == sorted(kept)  # file order
    for c, n in enumerate(CIFAR10_LT_TRAIN):
        first = np.flatnonzero(train_labels == c)[:n].tolist()
        assert [m for label, m in train if label == c] == first
    test = [(label, markers(image)) for split, label, image in records if split == "test"]
    assert test == list(zip(test_labels.tolist(), range(50_000, 60_000), strict=True))

    spec = {"source": "cifar", "params": params, "stated_size": STATED_SIZES["cifar10_lt"]}
    curate("cifar10_lt", spec, tmp_path / "lt", inputs={"archive": archive})
    summary = summarize(tmp_path / "lt")
    assert summary["splits"]["train"]["n"] == 12_406 and summary["splits"]["test"]["n"] == 10_000
    assert summary["splits"]["train"]["labels"] == dict(enumerate(CIFAR10_LT_TRAIN))
    rows = read_manifest(tmp_path / "lt")
    for row, (label, marker) in list(zip(rows, train, strict=False))[::997]:
        assert row.label == label
        with Image.open(tmp_path / "lt" / row.path) as image:
            assert markers(np.asarray(image)) == marker


def test_cifar100_long_tail(tmp_path, cifar100_archive, capsys):
    archive, test_labels = cifar100_archive
    spec = {
        "source": "cifar",
        "params": {"variant": 100, "imbalance_ratio": 0.01},
        "stated_size": {"train": 10_847, "test": 10_000},
    }
    curate("cifar100_lt", spec, tmp_path / "lt", inputs={"archive": archive})
    summary = summarize(tmp_path / "lt")
    assert summary["splits"]["train"]["n"] == 10_847
    assert summary["splits"]["train"]["labels"] == dict(enumerate(long_tail_counts(500, 100, 0.01)))
    assert summary["splits"]["test"]["n"] == 100
    # This test file is small: the size check flags it, and does not fail.
    err = capsys.readouterr().err
    assert "curated cifar100_lt: 10947 images" in err
    assert "WARNING: test has 100 images, the papers state 10000" in err
    assert "train has" not in err


def test_cifar_input_layout_and_errors(tmp_path, cifar100_archive):
    archive, _ = cifar100_archive
    # The batches folder itself is accepted as the archive input.
    records = cifar({"variant": 100}, {"archive": archive / "cifar-100-python"})
    assert sum(1 for split, _, _ in records if split == "test") == 100
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py"):
        cifar({"variant": 10}, {"archive": archive})
    with pytest.raises(ValueError, match=r"cifar: missing input\(s\) archive"):
        cifar({"variant": 10}, {})
    with pytest.raises(ValueError, match=r"cifar: unexpected input\(s\) root"):
        cifar({"variant": 10}, {"archive": archive, "root": archive})

    # The release was pickled by numpy 1 (`numpy.core`), which numpy 2 calls `numpy._core`.
    old = tmp_path / "numpy1" / "cifar-100-python"
    old.mkdir(parents=True)
    for name in ("train", "test"):
        data = (archive / "cifar-100-python" / name).read_bytes()
        assert b"cnumpy._core.multiarray\n_reconstruct\n" in data
        (old / name).write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert sum(1 for _ in cifar({"variant": 100}, {"archive": old.parent})) == 50_100

    # A pickle that would call a function is refused, not run.
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    (bad / "train").write_bytes((archive / "cifar-100-python/train").read_bytes())
    (bad / "test").write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match=r"test: not a CIFAR python batch.*getcwd is not allowed"):
        cifar({"variant": 100}, {"archive": tmp_path})
    # An unbalanced train split has no n_max for the long-tail rule.
    batch = pickle.loads((archive / "cifar-100-python/test").read_bytes(), encoding="bytes")
    batch[b"fine_labels"][0] = (batch[b"fine_labels"][0] + 1) % 100
    dump(bad / "train", batch)
    dump(bad / "test", batch)
    with pytest.raises(ValueError, match=r"long-tail rule needs a balanced train split"):
        cifar({"variant": 100, "imbalance_ratio": 0.1}, {"archive": tmp_path})


@pytest.mark.parametrize(
    ("source", "params", "match"),
    [
        ("cifar", {}, r"cifar: param 'variant' must be one of 10, 100, got None"),
        ("cifar", {"variant": "10"}, r"cifar: param 'variant'"),
        ("cifar", {"variant": 10, "ratio": 0.1}, r"cifar: unknown param\(s\) ratio; allowed"),
        ("cifar", {"variant": 10, "imbalance_ratio": 100}, r"cifar: param 'imbalance_ratio'"),
        ("svhn", {"per_label": 0}, r"svhn: param 'per_label' must be a positive int or null"),
        ("svhn", {"per_label": True}, r"svhn: param 'per_label'"),
        ("svhn", {"file": "../x.mat"}, r"svhn: param 'file' must be a relative path"),
        ("image_folder", {"labels": "yes"}, r"image_folder: param 'labels' must be one of"),
        ("image_folder", {"extensions": ".jpg"}, r"image_folder: param 'extensions'"),
        ("image_folder", {"split": "val"}, r"image_folder: param 'split'"),
        ("image_folder", {"limit": 1.5}, r"image_folder: param 'limit'"),
        ("image_list", {}, r"image_list: param 'list_file' is required"),
        ("image_list", {"list_file": "l.txt", "path_prefix": 3}, r"'path_prefix' must be a str"),
        ("tinyimages_npy", {"limit": -1}, r"tinyimages_npy: param 'limit'"),
        ("tinyimages_npy", {"n": 1}, r"tinyimages_npy: unknown param\(s\) n"),
    ],
)
def test_bad_params_name_source_and_key(tmp_path, source, params, match):
    with pytest.raises(ValueError, match=match):
        SOURCES[source](params, dict.fromkeys(INPUTS[source], tmp_path))
    with pytest.raises(ValueError, match=match):  # and curate writes nothing
        curate("bad", {"source": source, "params": params}, tmp_path / "bad",
               inputs=dict.fromkeys(INPUTS[source], tmp_path))  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_registry_covers_real_sources():
    from ood.data import manifest, real

    assert real.SPLITS == manifest.SPLITS  # a copy, so that the registry imports light
    assert set(SOURCES) == set(DEFAULTS) == set(INPUTS)
    assert INPUTS["image_list"] == ("root", "list") and INPUTS["gaussian_noise"] == ()
    assert STATED_SIZES["svhn"] == 10_000 and STATED_SIZES["imagenet_lt"]["train"] == 115_846


def test_svhn_first_thousand_per_label(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(1, 11), [1100 + 20 * d for d in range(10)]))
    n = len(y)
    # An asymmetric pattern (a wrong transpose shows), varied per image, plus the file position.
    h, w, c, i = np.ogrid[:32, :32, :3, :n]
    x = ((7 * h + 3 * w + 85 * c + i) % 256).astype(np.uint8)
    x[0, 0, 0], x[0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    archive = tmp_path / "svhn_test"
    archive.mkdir()
    scipy.io.savemat(archive / "test_32x32.mat", {"X": x, "y": y.reshape(-1, 1).astype(np.uint8)})

    spec = {"source": "svhn", "params": {}, "stated_size": STATED_SIZES["svhn"]}
    curate("svhn", spec, tmp_path / "svhn", inputs={"archive": archive})
    images, labels, _ = load_images(tmp_path / "svhn", split="test")
    assert images.shape == (10_000, 32, 32, 3)
    positions = images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)
    digits = np.where(y == 10, 0, y)
    expected = np.sort(np.concatenate([np.flatnonzero(digits == d)[:1000] for d in range(10)]))
    assert positions.tolist() == expected.tolist()  # the first 1,000 of each, in file order
    assert labels.tolist() == digits[expected].tolist()
    assert Counter(labels.tolist()) == dict.fromkeys(range(10), 1000)
    assert np.array_equal(images[123], x[:, :, :, expected[123]])
    assert np.array_equal(images, np.moveaxis(x[:, :, :, expected], 3, 0))

    with pytest.raises(ValueError, match=r"digit 1 has 1100 images, fewer than per_label = 1200"):
        svhn({"per_label": 1200}, {"archive": archive})
    assert len(list(svhn({"per_label": None}, {"archive": archive}))) == n
    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat not found"):
        svhn({"file": "train_32x32.mat"}, {"archive": archive})


def save_image(path: Path, size: tuple[int, int], value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[0, 0] = (value, 255 - value, 7)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture()
def dtd(tmp_path):
    """A DTD-like release: dtd/images/<class>/<files>, with clutter the reader must skip."""
    images = tmp_path / "dtd_download" / "dtd" / "images"
    files = {
        "zigzag/zigzag_0001.jpg": (40, 30),
        "banded/banded_0002.jpg": (32, 32),
        "banded/banded_0001.jpg": (50, 20),
        "crackled/crackled_0001.PNG": (16, 24),
        "crackled/sub/crackled_0009.jpeg": (20, 20),
    }
    for i, (rel, size) in enumerate(files.items()):
        save_image(images / rel, size, value=10 * i)
    (images / "zigzag" / ".directory").write_text("[Dolphin]\n")  # KDE clutter, as in DTD
    (images / "zigzag" / "._zigzag_0001.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (images / "banded" / "notes.txt").write_text("not an image\n")
    (images / "README.jpg").write_bytes(b"outside the class folders")
    return tmp_path / "dtd_download"


def test_image_folder_class_folders(tmp_path, dtd):
    spec = {"source": "image_folder", "params": {"subdir": "dtd/images"}, "stated_size": 5}
    curate("textures", spec, tmp_path / "tex", inputs={"root": dtd})
    rows = read_manifest(tmp_path / "tex")
    base = dtd / "dtd" / "images"
    expected = [  # sorted class folders, files sorted by relative path
        ("banded/banded_0001.jpg", 0),
        ("banded/banded_0002.jpg", 0),
        ("crackled/crackled_0001.PNG", 1),
        ("crackled/sub/crackled_0009.jpeg", 1),
        ("zigzag/zigzag_0001.jpg", 2),
    ]
    assert [(r.label, r.split) for r in rows] == [(label, "test") for _, label in expected]
    for row, (rel, _) in zip(rows, expected, strict=True):
        source = base / rel
        assert row.path == f"images/test/{row.label}/{row.index:05d}{source.suffix}"
        assert row.sha256 == sha256(source) == sha256(tmp_path / "tex" / row.path)
    # Images of different sizes curate fine; only loading them as one array refuses.
    with pytest.raises(
        DatasetError,
        match=r"differs from the dataset's .* read with the training setting images: stream",
    ):
        load_images(tmp_path / "tex")

    limited = list(image_folder({"subdir": "dtd/images", "limit": 3}, {"root": dtd}))
    assert [(label, path) for _, label, path in limited] == [
        (label, base / rel) for rel, label in expected[:3]
    ]
    params = {"subdir": "dtd/images", "labels": "none", "extensions": [".png"]}
    pngs = list(image_folder(params, {"root": dtd}))
    assert [path.name for _, _, path in pngs] == ["crackled_0001.PNG"]
    flat = list(image_folder({"labels": "none", "split": "train"}, {"root": base / "banded"}))
    assert [(s, label, p.name) for s, label, p in flat] == [
        ("train", 0, "banded_0001.jpg"),
        ("train", 0, "banded_0002.jpg"),
    ]
    with pytest.raises(ValueError, match=r"class folder .*banded has no image files"):
        image_folder({"subdir": "dtd/images", "extensions": [".jpeg", ".png"]}, {"root": dtd})
    with pytest.raises(FileNotFoundError, match=r"param 'subdir' = 'dtd/imgs'"):
        image_folder({"subdir": "dtd/imgs"}, {"root": dtd})


def test_file_records_are_copied_when_links_fail(tmp_path, dtd, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    source = dtd / "dtd/images/zigzag/zigzag_0001.jpg"
    records = [
        ("test", 0, source),
        ("test", 1, np.zeros((5, 7, 3), np.uint8)),
        ("train", 2, str(source)),
    ]
    write_dataset(tmp_path / "mixed", records)
    rows = read_manifest(tmp_path / "mixed")
    assert [r.path for r in rows] == [
        "images/test/0/00000.jpg",
        "images/test/1/00001.png",
        "images/train/2/00002.jpg",
    ]
    copied = tmp_path / "mixed" / rows[0].path
    assert copied.read_bytes() == source.read_bytes() and rows[0].sha256 == sha256(source)
    assert os.stat(copied).st_ino != os.stat(source).st_ino  # a copy, not a link
    for bad, match in [
        (tmp_path / "missing.jpg", r"missing\.jpg: image file not found"),
        (dtd / "dtd/images/banded/notes.txt", r"notes\.txt: not a readable image"),
        (dtd / "dtd/images/zigzag/.directory", r"\.directory: needs a plain file extension"),
    ]:
        with pytest.raises(DatasetError, match=match):
            write_dataset(tmp_path / "bad", [("test", 0, bad)])
        assert not (tmp_path / "bad").exists()


@pytest.fixture()
def listed(tmp_path):
    """ImageNet-style files under a root and a list folder for the list files."""
    root = tmp_path / "imagenet"
    for rel, value in [("train/n01/a.JPEG", 1), ("train/n02/b.JPEG", 2), ("val/c.png", 3)]:
        save_image(root / rel, (12, 10 + value), value)
    lists = tmp_path / "lists"
    lists.mkdir()
    return root, lists


def test_image_list_order_labels_and_prefix(tmp_path, listed):
    root, lists = listed
    (lists / "ImageNet_LT_train.txt").write_text(
        "train/n02/b.JPEG 7\n\n  train/n01/a.JPEG\t0\n/data/imagenet/val/c.png\n"
    )
    params = {
        "list_file": "ImageNet_LT_train.txt",
        "split": "train",
        "path_prefix": "/data/imagenet/",
    }
    spec = {"source": "image_list", "params": params, "stated_size": 3}
    curate("imagenet_lt", spec, tmp_path / "lt", inputs={"root": root, "list": lists})
    rows = read_manifest(tmp_path / "lt")
    assert [(r.split, r.label) for r in rows] == [("train", 7), ("train", 0), ("train", 0)]
    sources = [root / "train/n02/b.JPEG", root / "train/n01/a.JPEG", root / "val/c.png"]
    assert [r.sha256 for r in rows] == [sha256(p) for p in sources]
    assert [Path(r.path).suffix for r in rows] == [".JPEG", ".JPEG", ".png"]
    assert summarize(tmp_path / "lt")["splits"]["train"]["labels"] == {0: 2, 7: 1}

    # SCOOD lists: a dict literal after the path; the label is taken from `label_key`.
    (lists / "test_places365.txt").write_text(
        'val/c.png {"label": 3, "sc_label": -1}\ntrain/n01/a.JPEG {"sc_label": 2, "label": 0}\n'
    )
    records = image_list({"list_file": "test_places365.txt", "label_key": "sc_label"},
                         {"root": root, "list": lists})  # fmt: skip
    assert [(split, label) for split, label, _ in records] == [("test", -1), ("test", 2)]


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("train/n01/a.JPEG 0\ntrain/n02/b.JPEG zero\n", ValueError, r"l\.txt:2: malformed line"),
        ("train/n01/a.JPEG 0 1\n", ValueError, r"l\.txt:1: malformed line"),
        ("\ntrain/n01/a.JPEG {'sc': 1}\n", ValueError, r"l\.txt:2: malformed.*no 'label'"),
        ("train/n01/a.JPEG\n\n\ntrain/n03/x.JPEG 3\n", FileNotFoundError, r"l\.txt:4: train/n03/x"),
        ("../imagenet/val/c.png 1\n", ValueError, r"l\.txt:1: path '\.\./imagenet/val/c\.png'"),
        ("\n\n", ValueError, r"l\.txt lists no files"),
    ],
)
def test_image_list_errors_name_the_line(tmp_path, listed, text, error, match):
    root, lists = listed
    (lists / "l.txt").write_text(text)
    with pytest.raises(error, match=match):
        curate("bad", {"source": "image_list", "params": {"list_file": "l.txt"}}, tmp_path / "bad",
               inputs={"root": root, "list": lists})  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_tinyimages_npy(tmp_path):
    archive = tmp_path / "tinyimages"
    archive.mkdir()
    data = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.save(archive / "300K_random_images.npy", data)
    spec = {"source": "tinyimages_npy", "params": {"limit": 5}}
    curate("tiny", spec, tmp_path / "tiny", inputs={"archive": archive})
    images, labels, _ = load_images(tmp_path / "tiny", split="train")
    assert np.array_equal(images, data[:5]) and labels.tolist() == [0] * 5
    records = SOURCES["tinyimages_npy"]({}, {"archive": archive})
    assert sum(1 for _ in records) == 12
    np.save(archive / "bad.npy", data[..., 0])
    with pytest.raises(ValueError, match=r"bad\.npy: expected N x H x W x 3 uint8"):
        SOURCES["tinyimages_npy"]({"file": "bad.npy"}, {"archive": archive})


def test_curate_checks_input_roles(tmp_path, listed):
    root, lists = listed
    spec = {"source": "image_list", "params": {"list_file": "l.txt"}}
    with pytest.raises(
        ValueError,
        match=r"dataset 'places': source 'image_list' takes input role\(s\): root, list; "
        r"missing: list; unexpected: archive",
    ):
        curate("places", spec, tmp_path / "out", inputs={"root": root, "archive": lists})
    with pytest.raises(ValueError, match=r"dataset 'places': input 'list': .*nope is not a dir"):
        curate("places", spec, tmp_path / "out", inputs={"root": root, "list": tmp_path / "nope"})
    with pytest.raises(ValueError, match=r"dataset 'c': .*missing: archive"):
        curate("c", {"source": "cifar", "params": {"variant": 10}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_registry_import_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, ood.data.curate\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('scipy', 'sklearn', 'skimage', 'torch'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_split_folders_and_lists(tmp_path, listed):
    """ImageNet: train/ and val/ folders; ImageNet-LT: one list per split; both in one dataset."""
    root, lists = listed
    for rel, value in [("val/n01/d.JPEG", 4), ("val/n02/e.JPEG", 5)]:
        save_image(root / rel, (8, 8), value)
    (root / "val" / "c.png").unlink()  # class folders only, as a sorted ImageNet val
    spec = {
        "source": "image_folder",
        "params": {"subdir": {"train": "train", "test": "val"}},
        "stated_size": {"train": 2, "test": 2},
    }
    curate("imagenet", spec, tmp_path / "in", inputs={"root": root})
    rows = read_manifest(tmp_path / "in")
    assert [(r.split, r.label) for r in rows] == [
        ("train", 0),
        ("train", 1),
        ("test", 0),
        ("test", 1),
    ]
    assert [r.sha256 for r in rows] == [
        sha256(root / rel)
        for rel in ("train/n01/a.JPEG", "train/n02/b.JPEG", "val/n01/d.JPEG", "val/n02/e.JPEG")
    ]

    (lists / "lt_train.txt").write_text("train/n02/b.JPEG 1\n")
    (lists / "lt_test.txt").write_text("val/n01/d.JPEG 0\nval/n02/e.JPEG 1\n")
    spec = {
        "source": "image_list",
        "params": {"list_file": {"train": "lt_train.txt", "test": "lt_test.txt"}},
    }
    curate("imagenet_lt", spec, tmp_path / "lt", inputs={"root": root, "list": lists})
    summary = summarize(tmp_path / "lt")
    assert summary["splits"]["train"]["n"] == 1 and summary["splits"]["test"]["n"] == 2

    bad = {"source": "image_list", "params": {"list_file": {"val": "lt_test.txt"}}}
    with pytest.raises(ValueError, match=r"param 'list_file' maps splits \(train, test\)"):
        curate("bad", bad, tmp_path / "bad", inputs={"root": root, "list": lists})
    assert not (tmp_path / "bad").exists()
