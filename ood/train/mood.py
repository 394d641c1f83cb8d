"""MOOD (Li et al., CVPR 2023): masked image modeling on the ID data, then fine-tuning.

Two phases (each with its own optimiser and cosine schedule in the loop):

1. "mim", `mim_epochs` epochs, AdamW at `mim_lr` / `mim_weight_decay`, no
   layer decay, `mim_warmup_epochs` of warm-up. Per image a random
   `mask_ratio` of the patches (round(mask_ratio * N), at least one) is
   drawn from the loop's per-epoch generator; their patch embeddings are
   replaced by a learned mask token before the cls token and position
   embedding, and the encoder (timm's forward_features steps, masked) runs
   as usual. A linear decoder maps each final patch token (layer-normed:
   timm's mean-pooling BEiT leaves its final norm to fc_norm, which the
   classifier keeps) to its patch's p*p*3 pixels. The target is the
   patch's pixels t of the model input, normalised per patch,
   t_hat = (t - mean(t)) / sqrt(var(t) + 1e-6) (population variance over
   the patch's p*p*3 values), and:

       loss = 1/|M| * sum_{(b, n) in M} mean_k (decoder(z_bn)_k - t_hat_bnk)^2

   over the masked patches M of the batch. No class scores in this phase.
2. "finetune", `settings.epochs` epochs with the run's own settings (the
   paper's: AdamW lr 2e-5, layer decay 0.9, weight decay 1e-8, warm-up 5 of
   100 epochs, for BEiT-large): cross-entropy on `model(views[0])`.

With one ID class (the one-class protocol: each class as ID in turn) there is
nothing to fine-tune: only the MIM phase runs, and the checkpoint is the
MIM-trained encoder (its one-logit head untrained).

Deviations from the paper, plainly: BEiT predicts the discrete visual tokens
of a DALL-E tokenizer, which cannot ship offline; here the target is the
per-patch normalised pixels (SimMIM/MAE-style regression with a linear
decoder). Masking is uniformly random per patch, not BEiT's blockwise
masking. The mask token and decoder live in the objective's extra modules
(optimised and resumed, not saved in the classifier checkpoint).

Defaults: mask_ratio 0.4 (BEiT: 75 of 196 patches), mim_lr 1.5e-3 and
mim_weight_decay 0.05 are BEiT's pre-training values (its lr is for batch
2048: scale it for smaller batches). mim_epochs 10 and mim_warmup_epochs 1
are ours (BEiT: 800 epochs, 10 warm-up); the configs set them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ood.train.objective import Batch, Objective, Phase

PATCH_NORM_EPS = 1e-6


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches row-major over the grid (timm's token
    order), each flattened as (row in patch, column in patch, channel)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a whole number of {patch}x{patch} patches")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, height: int) -> torch.Tensor:
    """The inverse of `patchify` for images `height` pixels high."""
    b, n, _ = patches.shape
    gh = height // patch
    gw = n // gh
    x = patches.reshape(b, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * patch, gw * patch)


def normalized_patches(patches: torch.Tensor, eps: float = PATCH_NORM_EPS) -> torch.Tensor:
    """Each patch's values standardised by their own mean and (population) variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked patches (B, N) of the per-patch mean squared error."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches masked per image: round(ratio * N), at least one, at most N."""
    return min(max(int(round(ratio * num_patches)), 1), num_patches)


def random_mask(
    batch: int, num_patches: int, ratio: float, gen: torch.Generator | None
) -> torch.Tensor:
    """(B, N) bool, exactly `masked_count` True per row, uniformly at random from `gen`."""
    keys = torch.rand(batch, num_patches, generator=gen)
    chosen = keys.argsort(dim=1)[:, : masked_count(num_patches, ratio)]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask


def _kind(model: nn.Module) -> str | None:
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, Beit):
        return "beit"
    if isinstance(model, VisionTransformer):
        return "vit"
    return None


def check_token_backbone(model: nn.Module) -> None:
    if _kind(model) is None:
        name = getattr(model, "ood_backbone", type(model).__name__)
        raise ValueError(
            f"mood masks patch tokens; use a BEiT/ViT backbone (e.g. beit_tiny_32, "
            f"beit_l16_224), got {name!r}"
        )


def encode(
    model: nn.Module, images: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor
) -> torch.Tensor:
    """timm's forward_features with the masked patch embeddings replaced by `mask_token`.

    BEiT: patch_embed, [mask], cls token, pos_embed, pos_drop, shared relative
    position bias, blocks, norm. ViT: patch_embed, [mask], _pos_embed (prefix
    tokens, position embedding, dropout), patch_drop, norm_pre, blocks, norm.
    Returns all tokens (B, prefix + N, D), as forward_features does.
    """
    kind = _kind(model)
    x = model.patch_embed(images)
    if mask is not None:
        x = torch.where(mask.to(x.device).unsqueeze(-1), mask_token.to(x.dtype), x)
    if kind == "beit":
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for block in model.blocks:
            x = block(x, shared_rel_pos_bias=rel_pos_bias)
    elif kind == "vit":
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        x = model.blocks(x)
    else:
        check_token_backbone(model)
    return model.norm(x)


class MimHead(nn.Module):
    """The mask token (BEiT's init: truncated normal, std 0.02) and the linear pixel decoder.

    `norm`: a LayerNorm before the decoder, for backbones whose final norm is
    an identity because they mean-pool into fc_norm (timm's BEiT): BEiT's
    pre-training model normalises the tokens its prediction head reads.
    """

    def __init__(self, width: int, patch: int, channels: int, norm: bool) -> None:
        super().__init__()
        self.patch = patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.decoder = nn.Linear(width, patch * patch * channels)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(patch_tokens))


class MaskedImageModeling(Objective):
    name = "mood"
    summary = (
        "masked image modeling (normalised-pixel regression of masked patches), "
        "then CE fine-tuning; MIM only for one class"
    )
    paper = "Li et al., CVPR 2023"
    backbone = "BEiT-large/16 (ImageNet-22k MIM)"
    scorers = (
        "mahalanobis",
        "mood_cos",
        "mood_projection",
        "mood_gauss",
        "mood_kmeans",
        "mood_euclidean",
        "mood_minkowski",
        "mood_chebyshev",
        "msp",
        "energy",
    )
    defaults = {
        "mim_epochs": 10,
        "mim_warmup_epochs": 1,
        "mask_ratio": 0.4,
        "mim_lr": 1.5e-3,
        "mim_weight_decay": 0.05,
    }

    def check_param(self, key: str, value: Any) -> None:
        super().check_param(key, value)
        if key in ("mim_epochs", "mim_warmup_epochs") and not isinstance(value, int):
            raise ValueError(f"method 'mood': {key} must be an integer >= 0, got {value!r}")
        if key == "mask_ratio" and not 0 < value < 1:
            raise ValueError(f"method 'mood': mask_ratio must be in (0, 1), got {value!r}")
        if key == "mim_lr" and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"method 'mood': mim_lr must be > 0, got {value!r}")

    def setup(self, model: nn.Module, context) -> nn.Module | None:
        check_token_backbone(model)
        return super().setup(model, context)

    def build(self, model: nn.Module, num_classes: int) -> nn.Module:
        patch = model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"mood: square patches only, got {patch}")
        channels = model.patch_embed.proj.in_channels
        return MimHead(model.embed_dim, patch[0], channels, isinstance(model.norm, nn.Identity))

    def phases(self, settings) -> list[Phase]:
        mim = self.with_settings(
            settings,
            # The loop's warm-up reads the phase settings' epochs.
            epochs=self.params["mim_epochs"],
            optimizer="adamw",
            lr=self.params["mim_lr"],
            weight_decay=self.params["mim_weight_decay"],
            layer_decay=1.0,
            warmup_epochs=self.params["mim_warmup_epochs"],
        )
        stages = [Phase("mim", self.params["mim_epochs"], mim)]
        if self.context is None or self.context.num_classes > 1:
            stages.append(Phase("finetune", settings.epochs, settings))
        return stages

    def mim_loss(self, model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        head = self.extra
        tokens = encode(model, images, mask, head.mask_token)
        prefix = tokens.shape[1] - mask.shape[1]
        pred = head(tokens[:, prefix:])
        target = normalized_patches(patchify(images.float(), head.patch))
        return masked_mse(pred, target, mask.to(pred.device))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = batch.views[0]
        if batch.phase == "mim":
            num_patches = model.patch_embed.num_patches
            mask = random_mask(len(images), num_patches, self.params["mask_ratio"], batch.gen)
            return self.mim_loss(model, images, mask), None
        if batch.phase == "finetune":
            logits = model(images)
            return F.cross_entropy(logits, batch.labels), logits
        raise ValueError(f"mood: unknown phase {batch.phase!r} (mim, finetune)")
