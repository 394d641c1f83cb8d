"""timm backbones by name, adapted to the benchmark's input size.

A model here is a timm classifier; `features_and_logits` splits its forward
pass at the penultimate layer (the pooled feature the scorers read).
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from ood.io import atomic_path
from ood.models.specs import BACKBONES


def _adapt_stem(model: nn.Module, stem: str) -> None:
    """At 32x32 the ImageNet stem (7x7/2 conv + max-pool) would leave a 1x1 map."""
    if stem == "imagenet":
        return
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "cifar":
        model.maxpool = nn.Identity()


def build_model(backbone: str, num_classes: int, checkpoint: str | None = None) -> nn.Module:
    """Build a backbone with random init, or from pretrained weights on disk.

    Nothing is downloaded: `checkpoint` is a path to a state dict whose
    classifier may differ in size (it is then left freshly initialised).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[backbone]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes)
    _adapt_stem(model, spec.stem)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        # A pretrained head of another size (e.g. 1000 ImageNet classes) is dropped.
        current = model.state_dict()
        head = model.pretrained_cfg.get("classifier", "fc")
        head_keys = {k for k in current if k.startswith(head + ".")}
        if any(k in state and state[k].shape != current[k].shape for k in head_keys):
            state = {k: v for k, v in state.items() if k not in head_keys}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - head_keys:
            raise ValueError(
                f"{checkpoint}: does not fit backbone {backbone!r} "
                f"(missing {sorted(set(missing) - head_keys)[:5]}, unexpected {unexpected[:5]})"
            )
    return model


def features_and_logits(
    model: nn.Module, images: torch.Tensor, views: bool = False
) -> tuple[torch.Tensor, ...]:
    """Penultimate (pooled) features and logits from one forward pass.

    With `views`, also MODE's multi-scale views of the last feature map (B, 6, D).
    """
    feature_map = model.forward_features(images)
    feature = model.forward_head(feature_map, pre_logits=True)
    logits = model.get_classifier()(feature)
    if views:
        return feature, logits, multi_scale_views(feature_map)
    return feature, logits


N_VIEWS = 6


def multi_scale_views(feature_map: torch.Tensor) -> torch.Tensor:
    """MODE's six views of a (B, D, H, W) last feature map -> (B, 6, D).

    The four cells of an adaptive 2x2 average pool (local), the global average
    pool, and the average of the centre 2x2 cells (for an odd side, the
    centred window of size 2 rounded up to keep symmetry).
    """
    if feature_map.ndim != 4:
        raise ValueError(f"views need a (B, D, H, W) feature map, got shape {feature_map.shape}")
    _, _, height, width = feature_map.shape
    quadrants = nn.functional.adaptive_avg_pool2d(feature_map, 2).flatten(2)  # (B, D, 4)
    global_pool = feature_map.mean(dim=(2, 3))

    def centre(size: int) -> slice:
        span = 2 if size % 2 == 0 else min(3, size)
        start = (size - span) // 2
        return slice(start, start + span)

    middle = feature_map[:, :, centre(height), centre(width)].mean(dim=(2, 3))
    return torch.cat([quadrants.transpose(1, 2), global_pool[:, None], middle[:, None]], dim=1)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "meta": meta}, tmp)


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model a training run saved, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    # Built on the meta device, then the saved tensors are assigned: no random
    # init that the checkpoint would overwrite (half the load time at 32x32).
    with torch.device("meta"):
        # Group-softmax heads have more logits than classes (older checkpoints: equal).
        model = build_model(meta["backbone"], meta.get("num_logits", meta["num_classes"]))
    model.load_state_dict(blob["model"], assign=True)
    model.eval()
    return model, meta
