"""Backbone names and what they are, importable without torch (config checks use it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# imagenet: timm's own stem (7x7/2 conv + max-pool for ResNets, BiT's fixed-padding stem).
# cifar: 3x3/1 conv, no max-pool (the usual CIFAR ResNet, 4x4 final map at 32x32).
# cifar_pool: 3x3/1 conv keeping the max-pool (2x2 final map): 4x cheaper, for CPU demos.
# patch: a transformer's patch embedding, sized by the create_model overrides; left as built.
STEMS = ("imagenet", "cifar", "cifar_pool", "patch")


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    stem: str
    input_size: int
    summary: str
    head: str = "fc"  # state-dict prefix of the classifier (weight, bias)
    # A spatial last feature map (CNNs) gives the multi-scale views of csd.
    spatial: bool = True
    # timm.create_model overrides as (name, value) pairs: a tuple keeps the spec
    # frozen and hashable (a dict would not be). `create_kwargs` gives the dict.
    kwargs: tuple[tuple[str, Any], ...] = ()
    # A patch-token transformer (patch_embed, cls_token, blocks): what masked
    # image modeling needs to mask and predict patch tokens.
    tokens: bool = False

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.tokens and self.spatial:
            raise ValueError("a token transformer has no spatial (B, D, H, W) feature map")

    def create_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


# The CPU-demo transformers: 32x32 input in 4x4 patches (8x8 = 64 tokens + cls),
# width 96, 4 blocks of 3 heads: about 0.5M parameters.
_TINY_TRANSFORMER = (
    ("img_size", 32),
    ("patch_size", 4),
    ("embed_dim", 96),
    ("depth", 4),
    ("num_heads", 3),
)

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18_32": BackboneSpec(
        "resnet18", "cifar", 32, "ResNet-18, CIFAR stem (3x3/1 conv, no max-pool), 32x32 input"
    ),
    "resnet18_32_pool": BackboneSpec(
        "resnet18",
        "cifar_pool",
        32,
        "ResNet-18, 3x3/1 conv stem keeping the max-pool, 32x32 input (4x cheaper; CPU demo)",
    ),
    "resnet34_32": BackboneSpec(
        "resnet34", "cifar", 32, "ResNet-34, CIFAR stem (3x3/1 conv, no max-pool), 32x32 input"
    ),
    "resnet50": BackboneSpec("resnet50", "imagenet", 224, "ResNet-50, ImageNet stem, 224x224"),
    # MOS's backbone. Its timm classifier is a 1x1 conv on the pooled (B, D, 1, 1)
    # map: readers of the classifier reshape its (K, D, 1, 1) weight to (K, D).
    "bit_s_r101x1": BackboneSpec(
        "resnetv2_101x1_bit",
        "imagenet",
        224,
        "BiT-S-R101x1 (ResNetV2-101, group norm + weight standardisation), 224x224",
        head="head.fc",
    ),
    # MOOD's backbones. The feature is timm's pre-logits: the mean of the patch
    # tokens after fc_norm (BEiT's avg pooling), not the cls token.
    "beit_b16_224": BackboneSpec(
        "beit_base_patch16_224",
        "patch",
        224,
        "BEiT-B/16, 224x224 (mean-pooled patch tokens)",
        head="head",
        spatial=False,
        tokens=True,
    ),
    "beit_l16_224": BackboneSpec(
        "beit_large_patch16_224",
        "patch",
        224,
        "BEiT-L/16, 224x224 (mean-pooled patch tokens)",
        head="head",
        spatial=False,
        tokens=True,
    ),
    "beit_tiny_32": BackboneSpec(
        "beit_base_patch16_224",
        "patch",
        32,
        "BEiT at 32x32: 4x4 patches, width 96, depth 4, 3 heads (CPU demo)",
        head="head",
        spatial=False,
        kwargs=_TINY_TRANSFORMER,
        tokens=True,
    ),
    # OAML's teacher. The feature is the final-norm cls token.
    "vit_b16_224": BackboneSpec(
        "vit_base_patch16_224",
        "patch",
        224,
        "ViT-B/16, 224x224 (cls token)",
        head="head",
        spatial=False,
        tokens=True,
    ),
    "vit_tiny_32": BackboneSpec(
        "vit_tiny_patch16_224",
        "patch",
        32,
        "ViT at 32x32: 4x4 patches, width 96, depth 4, 3 heads (tests, demo teachers)",
        head="head",
        spatial=False,
        kwargs=_TINY_TRANSFORMER,
        tokens=True,
    ),
}
