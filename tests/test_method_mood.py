"""mood (masked image modeling, then fine-tuning): patch targets and the masked loss
against hand computations, the masked encoder against timm's forward_features,
where the gradients of each phase go, and the two-phase run in the shared loop
(order, log, determinism, resume inside and between phases, one-class MIM only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import assert_same_weights, read_log, state_dict, train_into, without_seconds
from torch.nn import functional as F

from ood.models.backbones import build_model
from ood.train import get_objective
from ood.train.loop import TrainSettings
from ood.train.mood import (
    encode,
    masked_count,
    masked_mse,
    normalized_patches,
    patchify,
    random_mask,
    unpatchify,
)
from ood.train.objective import Batch, TrainContext

BEIT = "beit_tiny_32"
# Fine-tuning as the paper's recipe has it (AdamW, layer decay, warm-up), scaled down.
SETTINGS = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 1e-3,
    "optimizer": "adamw",
    "layer_decay": 0.9,
    "weight_decay": 1e-8,
    "warmup_epochs": 1,
    "crop_padding": 2,
    "hflip": True,
}
MIM_EPOCHS = 2


def run(dataset, out, *, backbone=BEIT, stop_after_epoch=None, resume=True, **params):
    settings = TrainSettings.from_dict(
        {**SETTINGS, "method_params": {"mim_epochs": MIM_EPOCHS, **params}}
    )
    return train_into(
        dataset,
        out,
        "mood",
        settings,
        backbone=backbone,
        resume_dir=out / "resume" if resume else None,
        stop_after_epoch=stop_after_epoch,
    )


def tiny(backbone=BEIT, num_classes=3, **params):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes)
    objective = get_objective("mood", params)
    objective.setup(model, TrainContext.uniform(num_classes))
    return model, objective


# --- patch targets and the masked loss --------------------------------------------------


def test_patchify_and_normalised_targets_by_hand():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6) ** 1.5
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)  # a 2x3 grid of 2x2x3 patches
    x = images.numpy()
    for b in range(2):
        for n in range(6):
            row, col = divmod(n, 3)  # row-major over the grid
            expected = [
                x[b, c, 2 * row + i, 2 * col + j]
                for i in range(2)
                for j in range(2)
                for c in range(3)
            ]
            np.testing.assert_array_equal(patches[b, n].numpy(), expected)
    torch.testing.assert_close(unpatchify(patches, 2, 3, 4), images, rtol=0, atol=0)

    target = normalized_patches(patches)
    for b, n in [(0, 0), (1, 4)]:
        values = patches[b, n].tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)  # population variance
        by_hand = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
        np.testing.assert_allclose(target[b, n].numpy(), by_hand, rtol=1e-12)


def test_token_order_of_the_patch_embedding_is_the_patch_order():
    """Token n of timm's patch embedding is a linear map of patch n: targets line up."""
    model, _ = tiny()
    images = torch.randn(2, 3, 32, 32)
    proj = model.patch_embed.proj
    kernel = proj.weight.permute(0, 2, 3, 1).flatten(1)  # (D, p, p, C) like patchify
    by_patch = patchify(images, 4) @ kernel.T + proj.bias
    torch.testing.assert_close(model.patch_embed(images), by_patch, rtol=1e-4, atol=1e-5)


def test_masked_mse_by_hand():
    torch.manual_seed(0)
    pred, target = (
        torch.randn(2, 3, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, dtype=torch.float64),
    )
    mask = torch.tensor([[True, False, True], [False, False, True]])
    terms = [
        sum((float(pred[b, n, k]) - float(target[b, n, k])) ** 2 for k in range(4)) / 4
        for b in range(2)
        for n in range(3)
        if mask[b, n]
    ]
    assert float(masked_mse(pred, target, mask)) == pytest.approx(sum(terms) / 3, rel=1e-6)


def test_random_masks_count_and_replay():
    assert masked_count(196, 0.4) == 78 and masked_count(64, 0.4) == 26
    assert masked_count(4, 0.01) == 1  # never nothing to predict
    mask = random_mask(5, 64, 0.4, torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [26] * 5
    assert len({tuple(row.tolist()) for row in mask}) == 5  # each image its own mask
    again = random_mask(5, 64, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(mask, again)


# --- the masked encoder -----------------------------------------------------------------


@pytest.mark.parametrize("backbone", [BEIT, "vit_tiny_32"])
def test_unmasked_encoder_is_timms_forward_features(backbone):
    model, objective = tiny(backbone)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    token = objective.extra.mask_token
    with torch.no_grad():
        reference = model.forward_features(images)
        nothing = torch.zeros(3, 64, dtype=torch.bool)
        torch.testing.assert_close(encode(model, images, nothing, token), reference, rtol=0, atol=0)
        torch.testing.assert_close(encode(model, images, None, token), reference, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", [BEIT, "vit_tiny_32"])
def test_masked_positions_carry_the_mask_token_into_the_blocks(backbone):
    model, objective = tiny(backbone)
    model.eval()
    token = objective.extra.mask_token
    images = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 64, 0.4, torch.Generator().manual_seed(1))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    with torch.no_grad():
        tokens = encode(model, images, mask, token)
        embedded = model.patch_embed(images)
    first = seen[0][:, 1:]  # the block's input, past the cls token
    # BEiT here has relative position bias only; ViT adds an absolute position embedding.
    position = 0.0 if model.pos_embed is None else model.pos_embed[:, 1:].detach().expand(2, -1, -1)
    expected = torch.where(mask.unsqueeze(-1), token.detach(), embedded) + position
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    # So nothing of a masked patch's pixels reaches the encoder's output.
    changed = images.clone()
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48).double(), 4, 3, 32).bool()
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    with torch.no_grad():
        torch.testing.assert_close(encode(model, changed, mask, token), tokens)
        assert not torch.allclose(
            encode(model, changed, None, token), encode(model, images, None, token)
        )


# --- the two phases' losses and gradients -----------------------------------------------


def test_mim_loss_and_where_its_gradients_go():
    model, objective = tiny(mask_ratio=0.25)
    head = objective.extra
    model.train()
    images = torch.randn(3, 3, 32, 32)
    batch = Batch(
        [images], torch.tensor([0, 1, 2]), phase="mim", gen=torch.Generator().manual_seed(7)
    )
    loss, scores = objective.loss(model, batch)
    assert scores is None  # no class scores while pre-training

    # By hand: the same mask from the same generator, decoder on the masked tokens only.
    mask = random_mask(3, 64, 0.25, torch.Generator().manual_seed(7))
    tokens = encode(model, images, mask, head.mask_token)[:, 1:]
    pred = head.decoder(head.norm(tokens[mask]))
    target = normalized_patches(patchify(images, 4))[mask]
    assert len(pred) == 3 * 16
    expected = F.mse_loss(pred, target)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)

    loss.backward()
    for name in ("mask_token", "decoder.weight", "decoder.bias", "norm.weight"):
        assert dict(head.named_parameters())[name].grad.abs().sum() > 0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # The classifier (and BEiT's pooling norm in front of it) is untouched.
    for name in ("head.weight", "head.bias", "fc_norm.weight"):
        assert model.get_parameter(name).grad is None, name


def test_finetune_is_cross_entropy_and_where_its_gradients_go():
    model, objective = tiny()
    model.train()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 1])
    loss, logits = objective.loss(model, Batch([images], labels, phase="finetune"))
    expected = F.cross_entropy(model(images), labels)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert logits.shape == (3, 3)
    loss.backward()
    for name in (
        "head.weight",
        "fc_norm.weight",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in objective.extra.parameters())
    with pytest.raises(ValueError, match="mood: unknown phase 'train'"):
        objective.loss(model, Batch([images], labels))


def test_phases_and_parameter_checks():
    settings = TrainSettings.from_dict({**SETTINGS, "epochs": 5})
    model, objective = tiny(mim_epochs=3, mim_warmup_epochs=1)
    mim, finetune = objective.phases(settings)
    assert (mim.name, mim.epochs, finetune.name, finetune.epochs) == ("mim", 3, "finetune", 5)
    assert finetune.settings == settings
    s = mim.settings
    assert (s.epochs, s.optimizer, s.lr, s.weight_decay, s.layer_decay, s.warmup_epochs) == (
        3,
        "adamw",
        1.5e-3,
        0.05,
        1.0,
        1,
    )
    assert s.batch_size == settings.batch_size and s.crop_padding == settings.crop_padding
    _, one_class = tiny(num_classes=1, mim_epochs=3)
    assert [p.name for p in one_class.phases(settings)] == ["mim"]

    for params, message in [
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"mim_epochs": 1.5}, "mim_epochs must be an integer"),
        ({"mim_epochs": -1}, "'mim_epochs' must be a number >= 0"),
        ({"mim_epochs": True}, "'mim_epochs' must be a number >= 0"),
        ({"mim_lr": 0}, "mim_lr must be > 0"),
        ({"mim_weight_decay": -0.1}, "'mim_weight_decay' must be a number >= 0"),
        ({"mask": 0.4}, r"unknown parameter\(s\) mask"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_objective("mood", params)


# --- the shared loop --------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_class_digits(tmp_path_factory) -> Path:
    from ood.data.curate import curate

    spec = {
        "source": "sklearn_digits",
        "params": {"classes": [0], "max_per_class": 8, "train_fraction": 0.5},
    }
    out = tmp_path_factory.mktemp("one_class") / "digit0"
    curate("digit0", spec, out)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("mood_reference")
    meta = run(tiny_digits, out)
    return out, meta


def test_phases_run_in_order_and_the_checkpoint_is_the_classifier(uninterrupted):
    out, meta = uninterrupted
    assert meta["phases"] == [
        {"name": "mim", "epochs": MIM_EPOCHS, "lr": 1.5e-3},
        {"name": "finetune", "epochs": 2, "lr": 1e-3},
    ]
    assert meta["epochs"] == MIM_EPOCHS + 2
    columns, rows = read_log(out / "train_log.csv")
    assert "phase" in columns
    assert [(r["epoch"], r["phase"]) for r in rows] == [
        ("1", "mim"),
        ("2", "mim"),
        ("3", "finetune"),
        ("4", "finetune"),
    ]
    assert [r["accuracy"] == "" for r in rows] == [True, True, False, False]
    assert float(rows[-1]["accuracy"]) == meta["final_train_accuracy"]
    assert all(float(r["loss"]) > 0 for r in rows)
    # The mask token and decoder are not in the scorers' checkpoint.
    assert set(state_dict(out / "model.pt")) == set(build_model(BEIT, 3).state_dict())


def test_same_seed_identical_weights(tiny_digits, uninterrupted, tmp_path):
    run(tiny_digits, tmp_path, resume=False)
    assert_same_weights(uninterrupted[0] / "model.pt", tmp_path / "model.pt")


@pytest.mark.parametrize(
    "stop", [1, MIM_EPOCHS, MIM_EPOCHS + 1], ids=["inside_mim", "phase_boundary", "inside_finetune"]
)
def test_resume_equals_uninterrupted(stop, tiny_digits, uninterrupted, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tiny_digits, tmp_path, stop_after_epoch=stop)
    assert (tmp_path / "resume/last.pt").exists() and not (tmp_path / "model.pt").exists()
    run(tiny_digits, tmp_path)
    reference = uninterrupted[0]
    assert_same_weights(reference / "model.pt", tmp_path / "model.pt")
    assert without_seconds(read_log(tmp_path / "train_log.csv")[1]) == without_seconds(
        read_log(reference / "train_log.csv")[1]
    )


def test_one_class_runs_mim_only(one_class_digits, tmp_path):
    meta = run(one_class_digits, tmp_path, resume=False)
    assert meta["num_classes"] == 1 and meta["epochs"] == MIM_EPOCHS and "phases" not in meta
    assert meta["final_train_accuracy"] is None
    _, rows = read_log(tmp_path / "train_log.csv")
    assert len(rows) == MIM_EPOCHS and all(r["accuracy"] == "" for r in rows)
    # The encoder moved; the one-logit head (no gradient in MIM) is as initialised.
    torch.manual_seed(0)
    initial = build_model(BEIT, 1).state_dict()
    trained = state_dict(tmp_path / "model.pt")
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    for key in ("head.weight", "head.bias", "fc_norm.weight"):
        assert torch.equal(trained[key], initial[key]), key


def test_a_cnn_backbone_is_a_clear_error(tiny_digits, tmp_path):
    with pytest.raises(ValueError, match="mood masks patch tokens; use a BEiT/ViT backbone"):
        run(tiny_digits, tmp_path, backbone="resnet18_32_pool", resume=False)
    assert not (tmp_path / "model.pt").exists()
