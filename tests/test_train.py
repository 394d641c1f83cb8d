"""The training loop (ood.train), the CE objective and the backbones (ood.models).

Everything runs on CPU with one thread on 12 training images and the
cheapest backbone, so a full 3-epoch run takes about a second.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from ood.data.manifest import manifest_sha256, read_manifest
from ood.models.backbones import build_model, features_and_logits
from ood.train import get_objective
from ood.train.loop import LOG_COLUMNS, TrainSettings, train
from ood.train.objective import Batch

BACKBONE = "resnet18_32_pool"
# Augmentation on, so determinism and resume also cover the per-epoch crop/flip draws.
AUG = {"epochs": 3, "batch_size": 8, "lr": 0.02, "crop_padding": 2, "hflip": True}


def train_into(dataset, out, method, settings, *, backbone=BACKBONE, seed=0, **kwargs):
    """Train `method` on CPU with one thread into `out`/model.pt and `out`/train_log.csv;
    return the checkpoint meta. `kwargs` go to `train` (resume_dir, outliers_dir, ...)."""
    return train(
        dataset,
        out / "model.pt",
        out / "train_log.csv",
        method=method,
        backbone=backbone,
        settings=settings,
        seed=seed,
        device="cpu",
        threads=1,
        **kwargs,
    )


def run(dataset, out, *, seed=0, resume_dir=None, stop_after_epoch=None, **overrides):
    """Train ce into `out`/model.pt and `out`/train_log.csv; return the checkpoint meta."""
    settings = TrainSettings.from_dict({**AUG, **overrides})
    return train_into(
        dataset,
        out,
        "ce",
        settings,
        seed=seed,
        resume_dir=resume_dir,
        stop_after_epoch=stop_after_epoch,
    )


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(path_a, path_b):
    a, b = state_dict(path_a), state_dict(path_b)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different[:5]}"


def read_log(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def reference(tiny_digits, tmp_path_factory):
    """An uninterrupted run with the AUG settings, seed 0."""
    out = tmp_path_factory.mktemp("reference")
    run(tiny_digits, out)
    return out


# --- determinism and resume ---------------------------------------------------


def test_same_seed_gives_bit_identical_weights_and_log(tiny_digits, reference, tmp_path):
    run(tiny_digits, tmp_path)
    assert_same_weights(reference / "model.pt", tmp_path / "model.pt")
    header_a, rows_a = read_log(reference / "train_log.csv")
    header_b, rows_b = read_log(tmp_path / "train_log.csv")
    assert header_a == header_b == list(LOG_COLUMNS)
    # Everything but the wall-clock column is bit-identical text.
    assert without_seconds(rows_a) == without_seconds(rows_b)


def test_different_seed_gives_different_weights(tiny_digits, reference, tmp_path):
    meta = run(tiny_digits, tmp_path, seed=1)
    assert meta["seed"] == 1
    a, b = state_dict(reference / "model.pt"), state_dict(tmp_path / "model.pt")
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_resume_after_kill_equals_uninterrupted_run(tiny_digits, reference, tmp_path):
    resume = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 1"):
        run(tiny_digits, tmp_path, resume_dir=resume, stop_after_epoch=1)
    assert not (tmp_path / "model.pt").exists()
    assert not (tmp_path / "train_log.csv").exists()
    saved = torch.load(resume / "last.pt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and [row["epoch"] for row in saved["rows"]] == [1]
    assert sorted(p.name for p in resume.iterdir()) == ["last.pt"]  # no temp file left

    run(tiny_digits, tmp_path, resume_dir=resume)
    assert_same_weights(reference / "model.pt", tmp_path / "model.pt")
    _, resumed_rows = read_log(tmp_path / "train_log.csv")
    _, reference_rows = read_log(reference / "train_log.csv")
    assert without_seconds(resumed_rows) == without_seconds(reference_rows)
    assert not (resume / "last.pt").exists()  # the final checkpoint supersedes it


def test_resume_checkpoint_for_other_settings_is_ignored(tiny_digits, tmp_path):
    resume = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_digits, tmp_path / "stale", resume_dir=resume, stop_after_epoch=1)
    assert (resume / "last.pt").exists()

    run(tiny_digits, tmp_path / "resumed", resume_dir=resume, lr=0.01)
    run(tiny_digits, tmp_path / "fresh", lr=0.01)
    assert_same_weights(tmp_path / "fresh" / "model.pt", tmp_path / "resumed" / "model.pt")
    _, resumed_rows = read_log(tmp_path / "resumed" / "train_log.csv")
    _, fresh_rows = read_log(tmp_path / "fresh" / "train_log.csv")
    assert [row["epoch"] for row in resumed_rows] == ["1", "2", "3"]
    assert without_seconds(resumed_rows) == without_seconds(fresh_rows)
    assert not (resume / "last.pt").exists()


# --- what a run writes ----------------------------------------------------------


def test_train_log_has_one_row_per_epoch_and_cosine_lr(tiny_model):
    header, rows = read_log(tiny_model.log)
    assert header == ["epoch", "loss", "accuracy", "lr", "seconds"]
    settings = tiny_model.settings
    assert [int(row["epoch"]) for row in rows] == list(range(1, settings.epochs + 1))
    n = tiny_model.meta["n_train"]
    assert n == 12
    steps = math.ceil(n / settings.batch_size)
    total = settings.epochs * steps
    for epoch, row in enumerate(rows, start=1):
        accuracy = float(row["accuracy"])
        assert 0.0 <= accuracy <= 1.0
        assert accuracy * n == pytest.approx(round(accuracy * n), abs=1e-4)  # k / n
        assert float(row["seconds"]) >= 0.0
        assert math.isfinite(float(row["loss"])) and float(row["loss"]) > 0.0
        # Cosine annealing to zero, stepped once per batch.
        expected = 0.5 * settings.lr * (1.0 + math.cos(math.pi * epoch * steps / total))
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    assert tiny_model.meta["final_train_accuracy"] == pytest.approx(float(rows[-1]["accuracy"]))


def test_checkpoint_meta_records_provenance(tiny_model):
    blob = torch.load(tiny_model.checkpoint, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    assert meta == tiny_model.meta
    labels = {row.label for row in read_manifest(tiny_model.dataset)}
    assert meta["method"] == "ce"
    assert meta["backbone"] == BACKBONE
    assert meta["num_classes"] == len(labels) == 3
    assert meta["seed"] == 0
    assert meta["settings"] == asdict(tiny_model.settings)
    assert meta["settings"]["lr"] == 0.02 and meta["settings"]["crop_padding"] == 0
    assert meta["epochs"] == 3
    assert meta["dataset_manifest_sha256"] == manifest_sha256(tiny_model.dataset)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["dataset_manifest_sha256"])
    assert blob["model"]["fc.weight"].shape == (3, 512)


def test_training_lowers_the_loss(tiny_model):
    _, rows = read_log(tiny_model.log)
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.9 * first, (first, last)


# --- objectives and settings ----------------------------------------------------


def test_ce_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images = torch.randn(6, 3, 4, 4)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    loss, logits = get_objective("ce").loss(model, Batch([images], labels))

    # Independent computation in float64 numpy: mean of -log softmax at the label.
    weight = model[1].weight.detach().double().numpy()
    bias = model[1].bias.detach().double().numpy()
    z = images.double().numpy().reshape(6, -1) @ weight.T + bias
    log_softmax = z - z.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    expected = -log_softmax[np.arange(6), labels.numpy()].mean()

    np.testing.assert_allclose(logits.detach().numpy(), z, rtol=1e-5, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the loss is differentiable with respect to the model
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known: .*\bce\b"):
        get_objective("nope")
    with pytest.raises(
        ValueError, match="method 'ce': unknown parameter\\(s\\) temperature; known: none"
    ):
        get_objective("ce", {"temperature": 2.0})


def test_settings_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['learning_rate'\]"):
        TrainSettings.from_dict({"epochs": 2, "learning_rate": 0.1})
    assert TrainSettings.from_dict({"epochs": 2, "lr": 0.1}).lr == 0.1


# --- backbones ------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "side"), [("resnet18_32", 4), ("resnet18_32_pool", 2)])
def test_backbone_feature_shapes(backbone, side):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=7).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feature_map = model.forward_features(images)
        feature, logits = features_and_logits(model, images)
        full = model(images)
    assert feature_map.shape == (2, 512, side, side)
    assert feature.shape == (2, 512)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(feature, feature_map.mean((2, 3)))
    torch.testing.assert_close(logits, full)


def test_unknown_backbone_is_an_error(tiny_digits, tmp_path):
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'; known: .*resnet18_32_pool"):
        build_model("resnet9", 3)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        train(
            tiny_digits,
            tmp_path / "model.pt",
            tmp_path / "log.csv",
            method="ce",
            backbone="resnet9",
            settings=TrainSettings(epochs=1),
            seed=0,
            device="cpu",
        )
    assert not (tmp_path / "model.pt").exists()


def test_pretrained_weights_keep_backbone_and_reinit_other_size_head(tmp_path):
    torch.manual_seed(123)
    source = build_model(BACKBONE, num_classes=10)
    source_state = source.state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save(source_state, path)

    torch.manual_seed(7)
    fresh = build_model(BACKBONE, num_classes=3)
    torch.manual_seed(7)
    loaded = build_model(BACKBONE, num_classes=3, checkpoint=str(path))
    loaded_state = loaded.state_dict()

    # Different seeds, so a backbone that was not loaded would not match.
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    backbone_keys = [key for key in source_state if not key.startswith("fc.")]
    assert len(backbone_keys) > 50
    assert all(torch.equal(loaded_state[key], source_state[key]) for key in backbone_keys)
    # The head has the new size and is the fresh initialisation for that seed.
    assert loaded.fc.weight.shape == (3, 512)
    assert torch.equal(loaded.fc.weight, fresh.fc.weight)
    assert torch.equal(loaded.fc.bias, fresh.fc.bias)


def test_pretrained_head_of_same_size_is_kept(tmp_path):
    torch.manual_seed(123)
    source = build_model(BACKBONE, num_classes=3)
    path = tmp_path / "pretrained.pt"
    torch.save({"model": source.state_dict()}, path)  # the training checkpoint layout
    torch.manual_seed(7)
    loaded = build_model(BACKBONE, num_classes=3, checkpoint=str(path))
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_pretrained_weights_for_another_architecture_are_an_error(tmp_path):
    state = build_model(BACKBONE, num_classes=3).state_dict()
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: does not fit backbone")):
        build_model(BACKBONE, num_classes=3, checkpoint=str(path))


def test_smaller_images_train_upsampled_larger_ones_are_refused(tiny_digits_16, tmp_path):
    meta = run(tiny_digits_16, tmp_path / "small", epochs=1)
    assert meta["n_train"] == 12 and (tmp_path / "small/model.pt").exists()
    from ood.data.curate import curate

    big = tmp_path / "digits_48"
    spec = {
        "source": "sklearn_digits",
        "params": {"classes": [0, 1], "image_size": 48, "max_per_class": 3},
    }
    curate("digits_48", spec, big)
    with pytest.raises(ValueError, match=re.escape(f"{big} (backbone ")) as err:
        run(big, tmp_path / "big")
    assert "images are 48x48, the backbone takes 32x32" in str(err.value)
    assert not (tmp_path / "big/model.pt").exists()
    assert not (tmp_path / "big/train_log.csv").exists()


def test_gpu_only_settings_leave_a_cpu_run_unchanged(tiny_digits, reference, tmp_path):
    """amp and channels_last act on a GPU only: on CPU the weights are those of the reference
    (which has both on, the defaults)."""
    run(tiny_digits, tmp_path, amp=False, channels_last=False)
    assert_same_weights(reference / "model.pt", tmp_path / "model.pt")


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    from ood.train.loop import make_optimizer

    model = nn.Linear(4, 2)
    settings = TrainSettings(epochs=4, lr=0.1, warmup_epochs=1)
    optimizer, scheduler = make_optimizer(model, None, settings, steps=40)  # 10 steps/epoch
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Warm-up: 10 steps from 1e-3 x lr up to lr, linearly.
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(0.1 * (1e-3 + (1 - 1e-3) * 5 / 10))
    # Then the cosine over the remaining 30 steps.
    for step in range(10, 40):
        expected = 0.05 * (1 + math.cos(math.pi * (step - 10) / 30))
        assert lrs[step] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_adamw_layer_decay_scales_lower_blocks_and_decays_extra_matrices():
    from ood.models.backbones import build_model
    from ood.train.loop import make_optimizer

    model = build_model("vit_tiny_32", 3)
    extra = nn.Linear(4, 4)
    settings = TrainSettings(optimizer="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    optimizer, _ = make_optimizer(model, extra, settings, steps=10)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    head, first = model.head.weight, model.blocks[0].attn.qkv.weight
    assert lr_of[id(head)] == pytest.approx(1e-3)
    depth = len(model.blocks)
    # timm: layer ids 0 (embeddings) .. depth + 1 (head); block i is layer i + 1.
    assert lr_of[id(first)] == pytest.approx(1e-3 * 0.5 ** (depth + 1 - 1))
    assert decay_of[id(extra.weight)] == 0.05 and decay_of[id(extra.bias)] == 0.0
    assert lr_of[id(extra.weight)] == pytest.approx(1e-3)
    assert len(lr_of) == len(list(model.parameters())) + 2


def test_unknown_optimizer_and_layer_decay_without_adamw_are_errors():
    with pytest.raises(ValueError, match="training setting optimizer: 'adam'; known: sgd, adamw"):
        TrainSettings(optimizer="adam")
    with pytest.raises(ValueError, match="layer_decay needs optimizer: adamw"):
        TrainSettings(layer_decay=0.9)
