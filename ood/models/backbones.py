"""timm backbones by name, adapted to the benchmark's input size.

A model here is a timm classifier; `features_and_logits` splits its forward
pass at the penultimate layer (the pooled feature the scorers read), and
`classifier_weights` reads its last layer as a (K, D) linear map whatever
timm made it (a Linear, or BiT's 1x1 conv on the pooled map).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from ood.io import atomic_path
from ood.models.specs import BACKBONES, BackboneSpec


def _adapt_stem(model: nn.Module, stem: str) -> None:
    """At 32x32 the ImageNet stem (7x7/2 conv + max-pool) would leave a 1x1 map."""
    if stem in ("imagenet", "patch"):
        return
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "cifar":
        model.maxpool = nn.Identity()


def build_model(backbone: str, num_classes: int, checkpoint: str | None = None) -> nn.Module:
    """Build a backbone with random init, or from pretrained weights on disk.

    Nothing is downloaded: `checkpoint` is a path to a state dict (bare, or
    under "model" / "state_dict" as training runs and official releases save
    it; BiT and ViT also take the official .npz) whose classifier may differ
    in size (it is then left freshly initialised).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[backbone]
    model = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=num_classes, **spec.create_kwargs()
    )
    _adapt_stem(model, spec.stem)
    # Lets errors name the backbone (e.g. views asked of a token transformer).
    model.ood_backbone = backbone
    if checkpoint:
        if str(checkpoint).endswith(".npz"):
            _load_npz(model, backbone, checkpoint)
        else:
            _load_state(model, backbone, spec, checkpoint)
    return model


def unwrap_state_dict(blob: object, checkpoint: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: bare, or under "model" / "state_dict"."""
    if isinstance(blob, dict):
        for key in ("model", "state_dict"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not all(torch.is_tensor(v) for v in blob.values()):
        raise ValueError(f"{checkpoint}: not a state dict (nor one under 'model'/'state_dict')")
    # Saved from DataParallel / DistributedDataParallel: every key starts with "module.".
    if blob and all(k.startswith("module.") for k in blob):
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    return blob


def _load_state(model: nn.Module, backbone: str, spec: BackboneSpec, checkpoint: str) -> None:
    try:
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle errors, not a torch file, ...
        raise ValueError(f"{checkpoint}: cannot read a state dict ({exc})") from None
    state = unwrap_state_dict(blob, checkpoint)
    # The family's converter from official layouts (timm's own layout passes unchanged):
    # e.g. resampling position embeddings or patch kernels to the model's size.
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception as exc:
            raise ValueError(
                f"{checkpoint}: does not fit backbone {backbone!r} (timm's converter failed: "
                f"{type(exc).__name__}: {exc})"
            ) from None
    current = model.state_dict()
    # A pretrained head of another size (e.g. 1000 ImageNet classes) is dropped whole.
    head_keys = {k for k in current if k.startswith(spec.head + ".")}
    if any(k in state and state[k].shape != current[k].shape for k in head_keys):
        state = {k: v for k, v in state.items() if k not in head_keys}
    # Checked here: load_state_dict would raise a bare RuntimeError on a shape mismatch.
    wrong = sorted(k for k, v in state.items() if k in current and v.shape != current[k].shape)
    missing = sorted(set(current) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(current))
    if wrong or missing or unexpected:
        raise ValueError(
            f"{checkpoint}: does not fit backbone {backbone!r} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]})"
        )
    model.load_state_dict(state, strict=False)


def _load_npz(model: nn.Module, backbone: str, checkpoint: str) -> None:
    """Official JAX/NumPy weights (BiT, ViT) through timm's converter for the family.

    timm loads a classifier only when its size matches the model's; another
    size is left freshly initialised, as for state dicts.
    """
    if not hasattr(model, "load_pretrained"):
        raise ValueError(f"{checkpoint}: backbone {backbone!r} takes no .npz weights")
    try:
        with torch.no_grad():
            model.load_pretrained(checkpoint)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a missing key, another shape, not an npz
        raise ValueError(
            f"{checkpoint}: does not fit backbone {backbone!r} ({type(exc).__name__}: {exc})"
        ) from None


def classifier_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier as a (K, D) weight and (K,) bias: logits = feature @ weight.T + bias.

    Views of the parameters (gradients flow to them). BiT's classifier is a
    1x1 conv on the pooled map; its (K, D, 1, 1) weight is the same linear map.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.groups == 1:
        return head.weight.flatten(1), head.bias
    raise ValueError(f"classifier {type(head).__name__} is not a linear map of the feature")


def linear_classifier(model: nn.Module) -> nn.Linear:
    """The classifier as an nn.Linear (the model's own, or one sharing BiT's conv weights).

    For code that calls the classifier as a module or swaps its weight
    (torch.func.functional_call); the shared copy is detached, for inference.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        return head
    weight, bias = classifier_weights(model)
    with torch.device("meta"):  # no random init to overwrite
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def classify(model: nn.Module, feature: torch.Tensor) -> torch.Tensor:
    """Logits of penultimate features (B, D), for any classifier `classifier_weights` reads."""
    weight, bias = classifier_weights(model)
    return nn.functional.linear(feature, weight, bias)


def features_and_logits(
    model: nn.Module, images: torch.Tensor, views: bool = False
) -> tuple[torch.Tensor, ...]:
    """Penultimate (pooled) features and logits from one forward pass.

    The feature is timm's pre-logits (the classifier's input): the pooled map
    for CNNs, the pooled tokens after the final norm for transformers. With
    `views`, also MODE's multi-scale views of the last feature map (B, 6, D).
    """
    name = getattr(model, "ood_backbone", None)
    if views and name in BACKBONES and not BACKBONES[name].spatial:
        raise ValueError(
            f"backbone {name!r} has no spatial (B, D, H, W) last feature map: "
            "multi-scale views need a CNN"
        )
    feature_map = model.forward_features(images)
    if views and feature_map.ndim != 4:
        raise ValueError(
            f"backbone {name or type(model).__name__!r}: views need a (B, D, H, W) last "
            f"feature map, got shape {tuple(feature_map.shape)}"
        )
    feature = model.forward_head(feature_map, pre_logits=True)
    logits = classify(model, feature)
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
    _materialise_buffers(model, path)
    model.eval()
    return model, meta


def _materialise_buffers(model: nn.Module, path: Path) -> None:
    """Compute the non-persistent buffers a meta-device build left without storage.

    A state dict does not hold them (BEiT's relative position index and zero
    k-bias): timm's modules recompute them in `init_non_persistent_buffers`.
    """
    for name, module in model.named_modules():
        empty = [key for key, b in module.named_buffers(recurse=False) if b.is_meta]
        if not empty:
            continue
        if not hasattr(module, "init_non_persistent_buffers"):
            raise ValueError(f"{path}: the checkpoint does not hold {name}.{empty[0]}")
        for key in empty:
            setattr(module, key, torch.empty_like(getattr(module, key), device="cpu"))
        module.init_non_persistent_buffers()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: the checkpoint does not hold {left[:5]}")
