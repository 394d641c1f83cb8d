"""The OOD-vs-ID near-duplicate audit (ood.data.dedup) on small generated datasets."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from ood.data import dedup
from ood.data.manifest import (
    DatasetError,
    load_images,
    manifest_sha256,
    read_manifest,
    write_dataset,
)
from ood.io import sha256_file

N_ID_TRAIN = 40
N_UNRELATED = 30


def texture(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A smooth random colour texture: Gaussian noise with a 1/f^2 amplitude spectrum."""
    f = np.fft.fftfreq(size)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    radius[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius**2
        spectrum[0, 0] = 0.0
        channels.append(np.real(np.fft.ifft2(spectrum)))
    x = np.stack(channels, axis=-1)
    x = (x - x.mean()) / x.std()
    return np.clip(128 + 40 * x, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 80) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def resized(image: np.ndarray, via: int = 48) -> np.ndarray:
    up = Image.fromarray(image).resize((via, via), Image.Resampling.BICUBIC)
    return np.asarray(up.resize(image.shape[1::-1], Image.Resampling.BICUBIC))


PERTURBATIONS = {
    "exact": lambda a, rng: a.copy(),
    "exact2": lambda a, rng: a.copy(),
    "brightness": lambda a, rng: np.clip(a.astype(np.int16) + 10, 0, 255).astype(np.uint8),
    "noise": lambda a, rng: np.clip(a + rng.normal(0, 3, a.shape), 0, 255).astype(np.uint8),
    "resize": lambda a, rng: resized(a),
    "jpeg": lambda a, rng: jpeg(a),
    "shift": lambda a, rng: np.concatenate([a[:, :1], a[:, :-1]], axis=1),  # 1 px right
}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """ID: 40 train + 5 test textures. OOD: 7 planted near-duplicates among 30 unrelated."""
    root = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(0)
    id_images = [texture(rng) for _ in range(N_ID_TRAIN + 5)]
    # Test rows first, so manifest index != position in the train split.
    id_records = [("test", 0, img) for img in id_images[N_ID_TRAIN:]]
    id_records += [("train", i % 4, img) for i, img in enumerate(id_images[:N_ID_TRAIN])]
    write_dataset(root / "id", id_records)
    id_rows = read_manifest(root / "id")
    train_rows = [row for row in id_rows if row.split == "train"]

    unrelated = [texture(rng) for _ in range(N_UNRELATED - 1)]
    unrelated.append(id_images[N_ID_TRAIN])  # a copy of an ID *test* image: not audited
    partners = rng.choice(N_ID_TRAIN, size=len(PERTURBATIONS), replace=False)
    planted = [
        (name, train_rows[p].index, fn(id_images[p], rng))
        for (name, fn), p in zip(PERTURBATIONS.items(), partners, strict=True)
    ]
    items = [(None, None, img) for img in unrelated] + planted
    order = rng.permutation(len(items))
    items = [items[k] for k in order]
    write_dataset(root / "ood", [("test", k % 3, img) for k, (_, _, img) in enumerate(items)])
    expected = {k: (name, partner) for k, (name, partner, _) in enumerate(items) if name}
    return root, expected


@pytest.fixture(scope="module")
def default_audit(sets):
    root, _ = sets
    result = dedup.audit(root / "id", root / "ood", root / "audit")
    return result


def read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [dict(zip(header, row, strict=True)) for row in reader]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_planted_duplicates_flagged_with_their_partner(sets, default_audit):
    root, expected = sets
    result = default_audit
    assert result.out_dir == root / "audit" and result.dedup_dir is None
    assert (result.n_ood, result.n_id, result.threshold) == (37, N_ID_TRAIN, 0.95)
    assert result.n_flagged == len(PERTURBATIONS)
    header, rows = read_csv(root / "audit" / "pairs.csv")
    assert tuple(header) == dedup.PAIR_COLUMNS
    assert sorted(int(r["ood_index"]) for r in rows) == list(range(37))  # one row per OOD image
    sims = [float(r["similarity"]) for r in rows]
    assert sims == sorted(sims, reverse=True)
    ood_rows, id_rows = read_manifest(root / "ood"), read_manifest(root / "id")
    for r in rows:
        k, partner = int(r["ood_index"]), int(r["id_index"])
        assert r["ood_path"] == ood_rows[k].path and r["id_path"] == id_rows[partner].path
        assert id_rows[partner].split == "train"
        assert r["duplicate"] == str(int(float(r["similarity"]) >= 0.95))
    flagged = {int(r["ood_index"]): int(r["id_index"]) for r in rows if r["duplicate"] == "1"}
    assert flagged == {k: partner for k, (_, partner) in expected.items()}
    by_name = {expected[int(r["ood_index"])][0]: float(r["similarity"]) for r in rows[:7]}
    assert by_name["exact"] == by_name["exact2"] == 1.0
    unrelated = [float(r["similarity"]) for r in rows if int(r["ood_index"]) not in expected]
    assert max(unrelated) < 0.9  # clear margin, including the copy of an ID test image
    assert not (root / "audit" / "dedup").exists() and not (root / "audit" / "removed.csv").exists()
    assert leftovers(root) == []


def test_report_and_thumbnails(sets, default_audit):
    root, _ = sets
    report = (root / "audit" / "report.md").read_text()
    for line in ("| OOD images | 37 |", f"| ID images | {N_ID_TRAIN} |", "| flagged | 7 |"):
        assert line in report
    assert "| threshold | 0.95" in report and "grayscale 16x16" in report
    assert manifest_sha256(root / "ood") in report and manifest_sha256(root / "id") in report
    table = [line for line in report.splitlines() if "| images/test/" in line]  # flagged pairs
    assert len(table) == 7 and table[0].startswith("| 1.000000 | ")
    with Image.open(root / "audit" / "thumbnails.png") as image:
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 200
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 100


def numpy_embedding(file) -> np.ndarray:
    """Independent of dedup.py: float grayscale, 2x2 block means, centred, unit norm."""
    with Image.open(file) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    small = gray.reshape(16, 2, 16, 2).mean(axis=(1, 3)).ravel()
    small -= small.mean()
    return small / np.linalg.norm(small)


def test_similarity_matches_plain_numpy(sets, default_audit):
    root, expected = sets
    id_rows = [r for r in read_manifest(root / "id") if r.split == "train"]
    ood_rows = read_manifest(root / "ood")
    bank = np.stack([numpy_embedding(root / "id" / r.path) for r in id_rows])
    queries = np.stack([numpy_embedding(root / "ood" / r.path) for r in ood_rows])
    cosine = queries @ bank.T
    _, rows = read_csv(root / "audit" / "pairs.csv")
    for r in rows:
        k = int(r["ood_index"])
        partner = [row.index for row in id_rows].index(int(r["id_index"]))
        assert float(r["similarity"]) == pytest.approx(cosine[k, partner], abs=2e-3)
        assert cosine[k].max() - cosine[k, partner] < 2e-3  # it is the nearest one
    jpeg_k = next(k for k, (name, _) in expected.items() if name == "jpeg")
    assert 0.95 < cosine[jpeg_k].max() < 0.9999  # a non-trivial pair was compared


def test_embed_vectors(sets):
    root, _ = sets
    vectors, rows = dedup.embed(root / "id", split="test", size=8)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 64)
    assert [r.index for r in rows] == list(range(5))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors.sum(axis=1), 0.0, atol=1e-5)
    with pytest.raises(DatasetError, match="no images in split 'train'"):
        dedup.embed(root / "ood", split="train")


def test_drop_writes_dedup_set_and_removed_list(sets, tmp_path):
    root, expected = sets
    result = dedup.audit(root / "id", root / "ood", tmp_path / "audit", drop=True)
    assert result.n_flagged == 7 and result.dedup_dir == tmp_path / "audit" / "dedup"
    ood_rows = read_manifest(root / "ood")
    kept = [r for r in ood_rows if r.index not in expected]
    new_rows = read_manifest(result.dedup_dir)
    assert [(r.label, r.split, r.sha256) for r in new_rows] == [
        (r.label, r.split, r.sha256) for r in kept
    ]
    for row in new_rows:  # byte-identical files
        assert sha256_file(result.dedup_dir / row.path) == row.sha256
    info = json.loads((result.dedup_dir / "dataset.json").read_text())
    assert info["source_index"] == [r.index for r in kept]
    assert [ood_rows[k].path for k in info["source_index"]] == [r.path for r in kept]
    header, removed = read_csv(tmp_path / "audit" / "removed.csv")
    assert tuple(header) == dedup.REMOVED_COLUMNS
    assert [int(r["ood_index"]) for r in removed] == sorted(expected)
    for r in removed:
        k = int(r["ood_index"])
        assert r["ood_path"] == ood_rows[k].path and int(r["id_index"]) == expected[k][1]
        assert float(r["similarity"]) >= 0.95
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "audit") == []


def test_images_of_different_sizes_and_formats(tmp_path):
    rng = np.random.default_rng(1)
    big = texture(rng, 64)
    shapes = [(20, 20), (40, 24), (32, 32), (24, 56)]
    images = [big] + [
        np.asarray(Image.fromarray(texture(rng, 64)).resize((w, h))) for h, w in shapes
    ]
    images.append(np.full((30, 30, 3), 77, dtype=np.uint8))  # constant: zero vector
    write_dataset(tmp_path / "mixed", [("train", 0, img) for img in images])
    vectors, rows = dedup.embed(tmp_path / "mixed")
    assert vectors.shape == (6, 256) and len(rows) == 6
    np.testing.assert_allclose(np.linalg.norm(vectors[:5], axis=1), 1.0, atol=1e-5)
    assert not vectors[5].any()

    jpegs = []
    for k, image in enumerate([texture(rng, 48), images[3]]):  # unrelated, near-duplicate
        jpegs.append(tmp_path / f"photo{k}.jpg")
        Image.fromarray(image).save(jpegs[-1], format="JPEG", quality=85)
    query = [
        np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BOX)),  # -> 0
        np.asarray(Image.fromarray(images[2]).resize((80, 48))),  # -> 2
        images[5],  # constant
        *jpegs,  # kept as .jpg files; the second -> 3
    ]
    write_dataset(tmp_path / "query", [("test", k, img) for k, img in enumerate(query)])
    result = dedup.audit(tmp_path / "mixed", tmp_path / "query", tmp_path / "audit", drop=True)
    _, pairs = read_csv(tmp_path / "audit" / "pairs.csv")
    found = {int(r["ood_index"]): (int(r["id_index"]), r["duplicate"]) for r in pairs}
    assert found[0] == (0, "1") and found[1] == (2, "1") and found[4] == (3, "1")
    assert found[2][1] == found[3][1] == "0"  # a constant image never matches, not even a copy
    assert result.n_flagged == 3
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "| constant images (never matched) | OOD 1, ID 1 |" in report
    kept = read_manifest(result.dedup_dir)
    assert [(r.label, r.path.rsplit(".", 1)[1]) for r in kept] == [(2, "png"), (3, "jpg")]
    assert kept[1].sha256 == sha256_file(jpegs[0])
    assert sha256_file(result.dedup_dir / kept[1].path) == sha256_file(jpegs[0])


def test_nothing_flagged_still_writes_thumbnails(sets, tmp_path):
    root, _ = sets
    rng = np.random.default_rng(2)
    write_dataset(tmp_path / "far", [("test", 0, texture(rng)) for _ in range(3)])
    result = dedup.audit(root / "id", tmp_path / "far", tmp_path / "audit", top=2)
    assert result.n_flagged == 0
    assert "No pair reached the threshold." in (tmp_path / "audit" / "report.md").read_text()
    with Image.open(tmp_path / "audit" / "thumbnails.png") as image:
        assert image.format == "PNG" and image.height > 50


def test_threshold_one_keeps_exact_copies(sets, tmp_path):
    root, expected = sets
    result = dedup.audit(root / "id", root / "ood", tmp_path / "audit", threshold=1)
    _, rows = read_csv(tmp_path / "audit" / "pairs.csv")
    flagged = {expected[int(r["ood_index"])][0] for r in rows if r["duplicate"] == "1"}
    assert {"exact", "exact2"} <= flagged <= {"exact", "exact2", "brightness"}
    assert result.n_flagged == len(flagged) and result.threshold == 1.0


@pytest.mark.parametrize("threshold", [0, -0.5, 1.01, math.nan, "0.9"])
def test_threshold_errors_name_the_dataset(sets, tmp_path, threshold):
    root, _ = sets
    with pytest.raises(ValueError, match="ood.*threshold"):
        dedup.audit(root / "id", root / "ood", tmp_path / "audit", threshold=threshold)
    assert not (tmp_path / "audit").exists()


def test_empty_split_and_bad_out_dir(sets, tmp_path):
    root, _ = sets
    with pytest.raises(DatasetError, match=f"{root / 'ood'}: no images in split 'train'"):
        dedup.audit(root / "ood", root / "id", tmp_path / "audit")
    with pytest.raises(ValueError, match="would replace dataset"):
        dedup.audit(root / "id", root / "ood", root / "ood")
    assert not (tmp_path / "audit").exists()


def test_failure_midway_leaves_nothing(sets, tmp_path, monkeypatch):
    root, _ = sets

    def broken(*args, **kwargs):
        raise RuntimeError("thumbnail writer failed")

    monkeypatch.setattr(dedup, "write_thumbnails", broken)
    with pytest.raises(RuntimeError, match="thumbnail writer failed"):
        dedup.audit(root / "id", root / "ood", tmp_path / "audit", drop=True)
    assert list(tmp_path.iterdir()) == []
    # An earlier audit stays as it was when a re-run fails (here: in the dedup step).
    monkeypatch.undo()
    dedup.audit(root / "id", root / "ood", tmp_path / "audit", threshold=0.99)
    before = (tmp_path / "audit" / "pairs.csv").read_bytes()

    def broken_dataset(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dedup, "write_dataset", broken_dataset)
    with pytest.raises(OSError, match="disk full"):
        dedup.audit(root / "id", root / "ood", tmp_path / "audit", drop=True)
    assert (tmp_path / "audit" / "pairs.csv").read_bytes() == before
    assert not (tmp_path / "audit" / "dedup").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]


def test_low_contrast_matches_are_marked(tmp_path):
    """Two faint gradients match (normalization magnifies them); the report says to look."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 1, 32)[None, :, None]

    def gradient(base, span):
        image = base + span * ramp + rng.normal(0, 0.7, (32, 32, 3))
        return np.clip(np.round(image), 0, 255).astype(np.uint8)

    write_dataset(tmp_path / "id", [("train", 0, gradient(120, 10)), ("train", 1, texture(rng))])
    write_dataset(tmp_path / "ood", [("test", 0, gradient(60, 8))])
    result = dedup.audit(tmp_path / "id", tmp_path / "ood", tmp_path / "audit")
    assert result.n_flagged == 1
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "| flagged with a low-contrast OOD image | 1 " in report
    assert "| images/train/0/00000.png | yes |" in report


def test_drop_refuses_to_empty_the_set(sets, tmp_path):
    root, _ = sets
    images, _, _ = load_images(root / "id", split="train")
    write_dataset(tmp_path / "copies", [("test", 0, img) for img in images[:3]])
    with pytest.raises(DatasetError, match="copies: all 3 images are near-duplicates"):
        dedup.audit(root / "id", tmp_path / "copies", tmp_path / "audit", drop=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copies"]
    assert dedup.audit(root / "id", tmp_path / "copies", tmp_path / "audit").n_flagged == 3
