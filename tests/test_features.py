"""Feature dumps (ood.features.extract) against an independent forward pass."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import ood
import ood.features
from ood.data.curate import curate
from ood.data.manifest import manifest_sha256
from ood.features import extract
from ood.models.backbones import load_checkpoint

OOD_SPEC = {
    "source": "sklearn_digits",
    "params": {"classes": [7, 8], "max_per_class": 3, "train_fraction": 0.0},
}
CONTEXT = {"benchmark": "tiny", "dataset": "tiny_digits", "fold": 3}


@pytest.fixture(scope="module")
def ood_digits(tmp_path_factory):
    """Digits 7 and 8 (labels 0 and 1 in their own manifest), test split only."""
    out = tmp_path_factory.mktemp("features_data") / "ood_digits"
    curate("ood_digits", OOD_SPEC, out)
    return out


@pytest.fixture(scope="module")
def id_dump(tiny_model, tmp_path_factory):
    """The ID test split of the tiny model, extracted once."""
    out = tmp_path_factory.mktemp("features") / "id_test.parquet"
    extract(
        tiny_model.checkpoint,
        tiny_model.dataset,
        "test",
        out,
        role="id",
        batch_size=64,
        device="cpu",
        threads=1,
        context=CONTEXT,
    )
    return out


def manifest_rows(dataset_dir, split):
    """(index, path, label) of one split, read with the csv module alone."""
    with open(dataset_dir / "manifest.csv", newline="") as handle:
        return [
            (int(row["index"]), row["path"], int(row["label"]))
            for row in csv.DictReader(handle)
            if row["split"] == split
        ]


def reference_forward(checkpoint, dataset_dir, split):
    """Features and logits recomputed from the PNG files, without ood.features."""
    model, meta = load_checkpoint(checkpoint)
    mean = np.array(meta["settings"]["mean"], dtype=np.float32)
    std = np.array(meta["settings"]["std"], dtype=np.float32)
    rows = manifest_rows(dataset_dir, split)
    pixels = []
    for _, path, _ in rows:
        with Image.open(dataset_dir / path) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = (np.stack(pixels) - mean) / std  # N x H x W x 3
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        features = model.forward_features(x).mean(dim=(2, 3))  # global average pool
        logits = model.get_classifier()(features)
    return features.numpy(), logits.numpy(), rows


def read_dump(path):
    table = pq.read_table(path)
    columns = {
        name: np.asarray(table[name].combine_chunks().flatten()).reshape(table.num_rows, -1)
        for name in ("logits", "feature")
    }
    metadata = json.loads(table.schema.metadata[b"oodbench"])
    return table, columns, metadata


def test_dump_matches_manifest_and_independent_forward_pass(tiny_model, id_dump):
    table, columns, _ = read_dump(id_dump)
    features, logits, rows = reference_forward(tiny_model.checkpoint, tiny_model.dataset, "test")

    assert table.column_names == ["index", "label", "logits", "feature"]
    assert table.schema.field("index").type == pa.int64()
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 3)
    assert table.schema.field("feature").type == pa.list_(pa.float32(), 512)

    # Exactly the test rows of the manifest; train rows come first, so not 0..N-1.
    assert table["index"].to_pylist() == [index for index, _, _ in rows]
    assert table["index"].to_pylist() == list(range(12, 24))
    labels = [label for _, _, label in rows]
    assert table["label"].to_pylist() == labels
    assert sorted(set(labels)) == [0, 1, 2]

    np.testing.assert_allclose(columns["feature"], features, atol=1e-4, rtol=0)
    np.testing.assert_allclose(columns["logits"], logits, atol=1e-4, rtol=0)
    assert np.all(columns["feature"] >= 0)  # post-ReLU features
    dump_accuracy = np.mean(columns["logits"].argmax(1) == np.array(labels))
    assert dump_accuracy == np.mean(logits.argmax(1) == np.array(labels))


def test_dump_metadata_records_provenance(tiny_model, id_dump):
    _, _, metadata = read_dump(id_dump)
    checkpoint_sha = hashlib.sha256(tiny_model.checkpoint.read_bytes()).hexdigest()
    manifest_sha = hashlib.sha256((tiny_model.dataset / "manifest.csv").read_bytes()).hexdigest()
    assert metadata["checkpoint_sha256"] == checkpoint_sha
    assert metadata["manifest_sha256"] == manifest_sha == manifest_sha256(tiny_model.dataset)
    assert metadata["split"] == "test"
    assert metadata["role"] == "id"
    assert metadata["ood_version"] == ood.__version__
    assert metadata["method"] == "ce"
    assert metadata["backbone"] == tiny_model.meta["backbone"]
    assert metadata["seed"] == str(tiny_model.meta["seed"])
    assert {key: metadata[key] for key in CONTEXT} == {k: str(v) for k, v in CONTEXT.items()}


def test_extract_returns_what_it_writes(tiny_model, tmp_path):
    out = tmp_path / "train.parquet"
    dump = extract(tiny_model.checkpoint, tiny_model.dataset, "train", out, role="id", device="cpu")
    table, columns, metadata = read_dump(out)
    assert dump.index.tolist() == table["index"].to_pylist() == list(range(12))
    assert dump.label.tolist() == table["label"].to_pylist()
    np.testing.assert_array_equal(dump.logits, columns["logits"])
    np.testing.assert_array_equal(dump.feature, columns["feature"])
    assert dump.metadata == metadata and metadata["split"] == "train"


def test_ood_role_writes_minus_one_labels(tiny_model, ood_digits, tmp_path):
    out = tmp_path / "ood.parquet"
    extract(tiny_model.checkpoint, ood_digits, "test", out, role="ood", device="cpu")
    table, columns, metadata = read_dump(out)
    rows = manifest_rows(ood_digits, "test")
    assert {label for _, _, label in rows} == {0, 1}  # the source labels are not kept
    assert table["index"].to_pylist() == [index for index, _, _ in rows] == list(range(6))
    assert table["label"].to_pylist() == [-1] * 6
    features, logits, _ = reference_forward(tiny_model.checkpoint, ood_digits, "test")
    np.testing.assert_allclose(columns["logits"], logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(columns["feature"], features, atol=1e-4, rtol=0)
    assert metadata["role"] == "ood"
    assert metadata["manifest_sha256"] == manifest_sha256(ood_digits)


def test_batch_size_does_not_change_results(tiny_model, id_dump, tmp_path):
    out = tmp_path / "small_batches.parquet"
    extract(
        tiny_model.checkpoint,
        tiny_model.dataset,
        "test",
        out,
        role="id",
        batch_size=3,
        device="cpu",
    )
    table_big, big, _ = read_dump(id_dump)
    table_small, small, _ = read_dump(out)
    assert table_small["index"].to_pylist() == table_big["index"].to_pylist()
    assert table_small["label"].to_pylist() == table_big["label"].to_pylist()
    np.testing.assert_allclose(small["logits"], big["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(small["feature"], big["feature"], atol=1e-5, rtol=0)


# --- errors leave nothing behind -----------------------------------------------


def test_bad_role_is_an_error(tiny_model, tmp_path):
    out = tmp_path / "dump.parquet"
    with pytest.raises(ValueError, match="role must be 'id' or 'ood', got 'train'"):
        extract(tiny_model.checkpoint, tiny_model.dataset, "test", out, role="train")
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_names_the_path(tiny_digits, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    out = tmp_path / "dump.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: checkpoint not found")):
        extract(missing, tiny_digits, "test", out, role="id", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_smaller_images_are_upsampled_to_the_backbone(tiny_model, tiny_digits_16, tmp_path):
    """16x16 images reach a 32x32 backbone upsampled bilinearly, as MOOD feeds CIFAR
    to a 224x224 BEiT; checked against upsampling by hand (torch's own
    interpolate on the PNG pixels, then the forward pass)."""
    out = tmp_path / "dump.parquet"
    extract(tiny_model.checkpoint, tiny_digits_16, "test", out, role="id", device="cpu")
    model, meta = load_checkpoint(tiny_model.checkpoint)
    rows = manifest_rows(tiny_digits_16, "test")
    pixels = []
    for _, path, _ in rows:
        with Image.open(tiny_digits_16 / path) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    mean = np.array(meta["settings"]["mean"], dtype=np.float32)
    std = np.array(meta["settings"]["std"], dtype=np.float32)
    x = torch.from_numpy(((np.stack(pixels) - mean) / std).transpose(0, 3, 1, 2).copy())
    assert x.shape[-1] == 16
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = model.forward_features(x).mean(dim=(2, 3))
    np.testing.assert_allclose(read_dump(out)[1]["feature"], features.numpy(), atol=1e-4)


def test_larger_images_name_the_dataset(tiny_model, tmp_path):
    from ood.data.curate import curate

    big = tmp_path / "digits_48"
    spec = {
        "source": "sklearn_digits",
        "params": {"classes": [0, 1], "image_size": 48, "max_per_class": 3},
    }
    curate("digits_48", spec, big)
    out = tmp_path / "dump.parquet"
    with pytest.raises(ValueError, match=re.escape(f"{big} (model ")) as err:
        extract(tiny_model.checkpoint, big, "test", out, role="id", device="cpu")
    assert "images are 48x48, the backbone takes 32x32" in str(err.value)
    assert not out.exists()


def test_failure_during_extraction_leaves_no_output(tiny_model, tmp_path, monkeypatch):
    calls = []

    def failing_forward(model, images, views=False):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("simulated failure in batch 2")
        with torch.no_grad():
            feature = model.forward_features(images).mean(dim=(2, 3))
        return feature, model.get_classifier()(feature)

    monkeypatch.setattr(ood.features, "features_and_logits", failing_forward)
    out = tmp_path / "out" / "dump.parquet"
    with pytest.raises(RuntimeError, match="simulated failure in batch 2"):
        extract(
            tiny_model.checkpoint,
            tiny_model.dataset,
            "test",
            out,
            role="id",
            batch_size=5,
            device="cpu",
        )
    assert calls == [5, 5]
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tiny_model, tmp_path, monkeypatch):
    def failing_write(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pq, "write_table", failing_write)
    out = tmp_path / "dump.parquet"
    with pytest.raises(OSError, match="disk full"):
        extract(tiny_model.checkpoint, tiny_model.dataset, "test", out, role="id", device="cpu")
    assert list(tmp_path.iterdir()) == []
