"""Demo data sources, curation and the manifest contract (ood.data)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from ood.data.curate import curate, summarize
from ood.data.demo import (
    DEFAULTS,
    INPUTS,
    SOURCES,
    gaussian_noise,
    resolve_params,
    sklearn_digits,
)
from ood.data.manifest import (
    DatasetError,
    load_images,
    manifest_sha256,
    read_manifest,
    write_dataset,
)

ID_SPEC = {
    "source": "sklearn_digits",
    "params": {"classes": [0, 1, 2, 3, 4, 5], "max_per_class": 20, "train_fraction": 0.5},
}


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits_id"
    assert curate("digits_id", ID_SPEC, out) == out / "manifest.csv"
    return out


def test_digits_split_is_stratified_and_relabelled(id_dir):
    rows = read_manifest(id_dir)
    assert [r.index for r in rows] == list(range(120))
    per_split = Counter(r.split for r in rows)
    assert per_split == {"train": 60, "test": 60}
    assert Counter((r.split, r.label) for r in rows) == {
        (split, label): 10 for split in ("train", "test") for label in range(6)
    }
    summary = summarize(id_dir)
    assert summary["n"] == 120 and summary["splits"]["train"]["labels"] == dict.fromkeys(
        range(6), 10
    )


def test_relabel_follows_class_order():
    params = {"classes": [9, 6], "max_per_class": 3, "train_fraction": 0.0}
    records = list(sklearn_digits(params, {}))
    assert Counter(label for _, label, _ in records) == {0: 3, 1: 3}
    assert {split for split, _, _ in records} == {"test"}
    # label 0 is digit 9: compare with a record built from digits [9] alone.
    only_nine = list(sklearn_digits({"classes": [9], "max_per_class": 3, "train_fraction": 0.0}))
    nines = [img for _, label, img in records if label == 0]
    assert all(np.array_equal(a, b[2]) for a, b in zip(nines, only_nine, strict=True))


def test_manifest_hashes_match_files(id_dir):
    for row in read_manifest(id_dir):
        data = (id_dir / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        assert row.path.startswith(f"images/{row.split}/{row.label}/")
    assert (
        manifest_sha256(id_dir)
        == hashlib.sha256((id_dir / "manifest.csv").read_bytes()).hexdigest()
    )


def test_load_images_round_trip(id_dir):
    expected = list(sklearn_digits(ID_SPEC["params"]))
    images, labels, index = load_images(id_dir)
    assert images.shape == (120, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and index.dtype == np.int64
    assert np.array_equal(images, np.stack([img for _, _, img in expected]))
    assert labels.tolist() == [label for _, label, _ in expected]
    assert index.tolist() == list(range(120))
    # gray digits are replicated to 3 equal channels
    assert np.array_equal(images[..., 0], images[..., 2])

    test_images, test_labels, test_index = load_images(id_dir, split="test")
    is_test = [split == "test" for split, _, _ in expected]
    assert np.array_equal(test_images, images[is_test])
    assert np.array_equal(test_index, np.flatnonzero(is_test))


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, id_dir):
    curate("again", ID_SPEC, tmp_path / "again")
    assert (tmp_path / "again/manifest.csv").read_bytes() == (id_dir / "manifest.csv").read_bytes()

    other = {"source": ID_SPEC["source"], "params": {**ID_SPEC["params"], "seed": 1}}
    curate("other", other, tmp_path / "other")
    train = {r.sha256 for r in read_manifest(id_dir) if r.split == "train"}
    test = {r.sha256 for r in read_manifest(id_dir) if r.split == "test"}
    other_train = {r.sha256 for r in read_manifest(tmp_path / "other") if r.split == "train"}
    assert not train & test  # disjoint (the 120 digits are distinct images)
    assert len(train) == 60 and other_train != train
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("spec", "n", "labels"),
    [
        ({"source": "skimage_textures", "params": {"per_image": 4}}, 12, 3),
        ({"source": "sample_photos", "params": {"per_image": 3}}, 18, 6),
        ({"source": "sample_photos", "params": {"names": ["china"], "per_image": 5}}, 5, 1),
        ({"source": "gaussian_noise", "params": {"n": 7, "image_size": 16}}, 7, 1),
    ],
)
def test_far_ood_sources(tmp_path, spec, n, labels):
    curate("far", spec, tmp_path / "far")
    summary = summarize(tmp_path / "far")
    assert summary["n"] == n and list(summary["splits"]) == ["test"]
    assert sorted(summary["splits"]["test"]["labels"]) == list(range(labels))
    images, _, _ = load_images(tmp_path / "far", split="test")
    size = spec["params"].get("image_size", 32)
    assert images.shape == (n, size, size, 3)
    assert images.std() > 0  # not blank crops
    with pytest.raises(DatasetError, match=r"far: no images in split 'train'"):
        load_images(tmp_path / "far", split="train")


def test_noise_statistics():
    pixels = np.stack([img for _, _, img in gaussian_noise({"n": 50})]) / 255.0
    # clipping at 0 and 1 (2 std away) keeps the mean and shrinks the std a little
    assert abs(pixels.mean() - 0.5) < 0.01
    assert 0.22 < pixels.std() < 0.25
    again = np.stack([img for _, _, img in gaussian_noise({"n": 50})]) / 255.0
    assert np.array_equal(pixels, again)


def test_default_sources_are_complete():
    assert set(SOURCES) == set(DEFAULTS) == set(INPUTS)
    assert resolve_params("gaussian_noise", {"n": 3})["std"] == 0.25
    assert INPUTS["sklearn_digits"] == () and INPUTS["cifar"] == ("archive",)


def test_demo_sources_take_no_inputs(tmp_path):
    with pytest.raises(
        ValueError, match=r"gaussian_noise: a demo source takes no inputs, got root"
    ):
        gaussian_noise({"n": 2}, {"root": tmp_path})
    with pytest.raises(ValueError, match=r"dataset 'noise': source 'gaussian_noise' takes input "):
        curate("noise", {"source": "gaussian_noise"}, tmp_path / "noise", inputs={"a": tmp_path})
    assert len(list(gaussian_noise({"n": 2}, {}))) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("stated", "warning"),
    [
        (None, None),
        (4, None),
        (5, "WARNING: 4 images, the papers state 5"),
        ({"test": 4}, None),
        ({"test": 4, "train": 2}, "WARNING: train has 0 images, the papers state 2"),
    ],
)
def test_stated_size_mismatch_warns(tmp_path, capsys, stated, warning):
    spec = {"source": "gaussian_noise", "params": {"n": 4}}
    if stated is not None:
        spec["stated_size"] = stated
    curate("noise", spec, tmp_path / "noise")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("curated noise: 4 images: test 4 (1 label)")
    if warning is None:
        assert "WARNING" not in line
    else:
        assert line.endswith(warning)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"source": "nope"}, r"unknown source 'nope'.*sklearn_digits"),
        ({"source": "gaussian_noise", "params": {"sigma": 1}}, r"gaussian_noise.*sigma"),
        ({"source": "gaussian_noise", "params": {"n": 0}}, r"'n' must be a positive int"),
        ({"source": "sklearn_digits", "params": {}}, r"'classes'"),
        ({"source": "sklearn_digits", "params": {"classes": [1], "max_per_class": 1.5}}, "max_per"),
        ({"source": "sample_photos", "params": {"per_image": -2}}, "per_image"),
        ({"source": "skimage_textures", "params": {"names": ["brik"]}}, r"'brik'.*brick, grass"),
        ({"source": "gaussian_noise", "size": 3}, r"'bad': unknown spec key\(s\) size; allowed"),
        ({"source": "gaussian_noise", "stated_size": 0}, r"'bad': stated_size must be a positive"),
        ({"source": "gaussian_noise", "stated_size": True}, r"stated_size must be"),
        ({"source": "gaussian_noise", "stated_size": {"val": 3}}, r"stated_size must be"),
    ],
)
def test_bad_spec_leaves_nothing(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        curate("bad", spec, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_tampered_or_missing_file_is_named(tmp_path):
    curate("noise", {"source": "gaussian_noise", "params": {"n": 3}}, tmp_path / "noise")
    rows = read_manifest(tmp_path / "noise")
    victim = tmp_path / "noise" / rows[1].path
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=rf"{rows[1].path}: sha256 does not match"):
        load_images(tmp_path / "noise")
    assert len(load_images(tmp_path / "noise", verify=False)[0]) == 3
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"{rows[1].path}: listed in the manifest but missing"):
        load_images(tmp_path / "noise", verify=False)


def test_bad_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"manifest\.csv: manifest not found"):
        read_manifest(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("index,path,label\n")
    with pytest.raises(DatasetError, match=r"manifest\.csv: header must be"):
        read_manifest(tmp_path)
    manifest.write_text("index,path,label,split,sha256\n0,a.png,x,test," + "0" * 64 + "\n")
    with pytest.raises(DatasetError, match=r"manifest\.csv:2: index and label must be integers"):
        read_manifest(tmp_path)
    manifest.write_text("index,path,label,split,sha256\n0,../a.png,0,val," + "0" * 64 + "\n")
    with pytest.raises(DatasetError, match=r"manifest\.csv:2: path '\.\./a\.png'"):
        read_manifest(tmp_path)


def test_mixed_sizes_rejected_on_load(tmp_path):
    records = [
        ("test", 0, np.zeros((8, 8, 3), np.uint8)),
        ("test", 0, np.zeros((9, 8, 3), np.uint8)),
    ]
    write_dataset(tmp_path / "mixed", records)
    with pytest.raises(DatasetError, match=r"00001\.png: size \(9, 8\) differs"):
        load_images(tmp_path / "mixed")


def test_failure_midway_keeps_old_dataset(tmp_path):
    out = tmp_path / "noise"
    curate("noise", {"source": "gaussian_noise", "params": {"n": 3}}, out)
    before = (out / "manifest.csv").read_bytes()

    def records():
        yield from gaussian_noise({"n": 2}, {})
        raise KeyboardInterrupt  # the worst case: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, records())
    assert (out / "manifest.csv").read_bytes() == before
    assert len(load_images(out)[0]) == 3
    assert leftovers(tmp_path) == []

    # a successful rewrite replaces it and cleans up the old copy
    write_dataset(out, gaussian_noise({"n": 2}))
    assert len(read_manifest(out)) == 2 and leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="noise"):
        write_dataset(out, gaussian_noise({"n": 2}), overwrite=False)


def test_digits_images_are_the_upsampled_digits():
    """Each image is its 8x8 digit upsampled: block means recover the original pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    records = list(sklearn_digits({"classes": [3], "max_per_class": 5, "train_fraction": 0.0}))
    originals = digits.images[digits.target == 3][:5] * (255.0 / 16.0)
    for (_, _, image), original in zip(records, originals, strict=True):
        assert image.shape == (32, 32, 3)
        assert np.array_equal(image[..., 0], image[..., 2])  # gray replicated
        blocks = image[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        # Bilinear smoothing blurs edges, but the 8x8 pattern must come through.
        assert np.corrcoef(blocks.ravel(), original.ravel())[0, 1] > 0.9


def test_texture_crops_keep_the_whole_crop():
    """A gray crop keeps all its columns: a vertical edge stays where it was."""
    from ood.data.demo import _resize_rgb

    gray = np.zeros((64, 64), dtype=np.uint8)
    gray[:, 32:] = 255  # right half white
    out = _resize_rgb(gray, 32)[..., 0]
    assert out[:, :14].max() == 0 and out[:, 18:].min() == 255
