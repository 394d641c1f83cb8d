"""Backbones by name (ood.models): BiT, BEiT and ViT beside the ResNets.

Every family is built from its name, loads weights from disk, splits its
forward pass at the classifier's input, and serves what reads the classifier
(read_head, the gradient scorers, feature dumps). The 224x224 base models are
built for real once each (about 1 s) and run on one or two images; BEiT-L
(300M parameters) is built on the meta device only (shapes, no numbers).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_patch_embed
from torch import nn

from ood.data.manifest import load_images
from ood.features import extract
from ood.io import FeatureSet
from ood.models.backbones import (
    build_model,
    classifier_weights,
    features_and_logits,
    load_checkpoint,
    save_checkpoint,
)
from ood.models.specs import BACKBONES, STEMS
from ood.scores import get_scorer
from ood.scores.base import Extras
from ood.scores.network import Network
from ood.scores.run import read_head
from ood.train.loop import TrainSettings, to_model_input, train

NUM_CLASSES = 7
TINY = ("beit_tiny_32", "vit_tiny_32")
# The pre-logits width of each backbone (the classifier's input D).
WIDTH = {
    "resnet18_32": 512,
    "resnet18_32_pool": 512,
    "resnet34_32": 512,
    "resnet50": 2048,
    "bit_s_r101x1": 2048,
    "beit_b16_224": 768,
    "beit_l16_224": 1024,
    "beit_tiny_32": 96,
    "vit_b16_224": 768,
    "vit_tiny_32": 96,
}
FAMILY = {
    "resnet18_32_pool": "cnn",
    "bit_s_r101x1": "cnn",
    "beit_b16_224": "beit",
    "beit_tiny_32": "beit",
    "vit_b16_224": "vit",
    "vit_tiny_32": "vit",
}
# A training run's normalisation, for the Network of models built here.
SETTINGS = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


def randomise_head(model: nn.Module) -> None:
    """Unit-scale classifier weights: BEiT/ViT start theirs near zero (logits ~1e-3),
    which would make any logit comparison pass within an absolute tolerance."""
    with torch.no_grad():
        for parameter in model.get_classifier().parameters():
            fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
            parameter.normal_(0.0, fan_in**-0.5)


@pytest.fixture(scope="module")
def built():
    """name -> a random-init model (seed 0, NUM_CLASSES, unit-scale head, eval), built once."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            model = build_model(name, NUM_CLASSES)
            randomise_head(model)
            cache[name] = model.eval()
        return cache[name]

    return get


def input_side(name: str) -> int:
    """BiT is fully convolutional: 64x64 exercises the same code 12x cheaper than 224."""
    return 64 if name == "bit_s_r101x1" else BACKBONES[name].input_size


def batch(name: str, n: int, seed: int = 1) -> torch.Tensor:
    size = input_side(name)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close_state(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


# -- specs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_spec_fields_describe_the_model(name):
    spec = BACKBONES[name]
    assert spec.stem in STEMS and hash(spec) == hash(spec)  # frozen, hashable
    with torch.device("meta"):  # shapes only: no weights allocated
        model = build_model(name, NUM_CLASSES)
        x = torch.empty(2, 3, spec.input_size, spec.input_size)
        feature_map = model.forward_features(x)
        feature = model.forward_head(feature_map, pre_logits=True)
    # `head` is the classifier's state-dict prefix, and it maps (B, D) -> (B, K).
    assert model.get_submodule(spec.head) is model.get_classifier()
    head_keys = {k for k in model.state_dict() if k.startswith(spec.head + ".")}
    assert head_keys == {f"{spec.head}.weight", f"{spec.head}.bias"}
    weight, bias = classifier_weights(model)
    assert weight.shape == (NUM_CLASSES, WIDTH[name]) and bias.shape == (NUM_CLASSES,)
    assert feature.shape == (2, WIDTH[name])
    # spatial: a (B, D, H, W) last map; tokens: (B, 1 + patches, D) from a patch transformer.
    assert (feature_map.ndim == 4) is spec.spatial
    is_tokens = all(hasattr(model, a) for a in ("patch_embed", "cls_token", "blocks"))
    assert is_tokens is spec.tokens
    if spec.tokens:
        grid = spec.input_size // model.patch_embed.patch_size[0]
        assert model.patch_embed.img_size == (spec.input_size, spec.input_size)
        assert feature_map.shape == (2, 1 + grid * grid, WIDTH[name])


def test_tiny_transformers_are_small():
    for name in TINY:
        spec = BACKBONES[name]
        assert spec.create_kwargs()["patch_size"] == 4 and spec.input_size == 32
        with torch.device("meta"):
            model = build_model(name, 10)
        assert len(model.blocks) == 4
        assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_specs_import_without_torch():
    code = (
        "import sys; from ood.models.specs import BACKBONES; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules; "
        "print(len(BACKBONES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(BACKBONES)


# -- one forward pass: feature and logits ------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_features_and_logits_match_the_model(built, name):
    model = built(name)
    x = batch(name, 1 if input_side(name) == 224 else 4)
    # What the classifier module receives inside the model's own forward pass.
    seen = []
    hook = model.get_classifier().register_forward_hook(
        lambda module, args, out: seen.append(args[0].flatten(1))  # BiT: (B, D, 1, 1)
    )
    try:
        with torch.no_grad():
            full = model(x)
    finally:
        hook.remove()
    with torch.no_grad():
        feature, logits = features_and_logits(model, x)
    assert len(seen) == 1 and feature.shape == (len(x), WIDTH[name])
    torch.testing.assert_close(feature, seen[0], atol=1e-5, rtol=1e-5)
    # The logits are the model's own (BiT: its 1x1 conv head on the pooled map).
    assert logits.shape == (len(x), NUM_CLASSES) and full.abs().max() > 0.1
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    weight, bias = classifier_weights(model)
    torch.testing.assert_close(feature @ weight.T + bias, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18_32_pool", *TINY])
def test_feature_is_the_family_pooling(built, name):
    """The feature written out per family, from the last map or tokens."""
    model = built(name)
    x = batch(name, 4)
    with torch.no_grad():
        feature, _ = features_and_logits(model, x)
        out = model.forward_features(x)
    if name.startswith("resnet"):
        expected = out.mean(dim=(2, 3))  # global average pool
    elif name.startswith("beit"):
        expected = model.fc_norm(out[:, 1:].mean(dim=1))  # mean patch token, then fc_norm
    else:
        expected = out[:, 0]  # the cls token after the final norm
    torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_views_need_a_spatial_feature_map(built, name, tmp_path):
    model = built(name)
    x = batch(name, 2)
    with pytest.raises(ValueError, match=f"backbone '{name}' has no spatial"):
        features_and_logits(model, x, views=True)
    # Also for a model rebuilt from a checkpoint, and a bare timm model (no name known).
    save_checkpoint(tmp_path / "m.pt", model, {"backbone": name, "num_classes": NUM_CLASSES})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(ValueError, match=f"backbone '{name}' has no spatial"):
        features_and_logits(loaded, x, views=True)
    bare = timm.create_model(BACKBONES[name].timm_name, **BACKBONES[name].create_kwargs()).eval()
    with pytest.raises(ValueError, match=re.escape("views need a (B, D, H, W) last feature map")):
        features_and_logits(bare, x, views=True)


def test_cnn_views_still_work(built):
    model = built("resnet18_32_pool")
    with torch.no_grad():
        feature, _, views = features_and_logits(model, batch("resnet18_32_pool", 2), views=True)
    assert views.shape == (2, 6, 512)
    torch.testing.assert_close(views[:, 4], feature)  # view 4: the global average pool


# -- pretrained weights from disk ----------------------------------------------------------


def pretrained_source(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(123)
    return build_model(name, num_classes)


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("beit_tiny_32", "bare"),
        ("beit_tiny_32", "model"),
        ("vit_tiny_32", "state_dict"),
        ("bit_s_r101x1", "model"),
    ],
)
def test_pretrained_backbone_loads_and_other_size_head_is_fresh(built, name, layout, tmp_path):
    # An ImageNet head of 1000 classes (BiT: the shared model's 7, to build it once).
    source = built(name) if name == "bit_s_r101x1" else pretrained_source(name, 1000)
    state = source.state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save(state if layout == "bare" else {layout: state, "epoch": 9}, path)

    torch.manual_seed(7)
    fresh = build_model(name, 3).state_dict()
    torch.manual_seed(7)
    loaded = build_model(name, 3, checkpoint=str(path)).state_dict()

    head = BACKBONES[name].head + "."
    body = [k for k in state if not k.startswith(head)]
    assert len(body) > 30
    # Seeds differ, so a body that was not loaded would not match the source.
    assert not close_state(fresh, state, body)
    assert close_state(loaded, state, body)
    # The 1000-class head is dropped: the new one has 3 rows and is the seed's fresh init.
    head_keys = [k for k in loaded if k.startswith(head)]
    assert len(head_keys) == 2 and loaded[head + "weight"].shape[0] == 3
    assert close_state(loaded, fresh, head_keys)


def test_pretrained_head_of_same_size_is_kept(tmp_path):
    source = pretrained_source("beit_tiny_32", 3)
    path = tmp_path / "pretrained.pt"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(7)
    loaded = build_model("beit_tiny_32", 3, checkpoint=str(path))
    assert torch.equal(loaded.head.weight, source.head.weight)
    assert torch.equal(loaded.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)


def test_official_beit_layout_is_converted(tmp_path):
    """An official-release layout: under "model", with the relative position index
    buffers saved, patches of another size: timm's beit converter makes it fit."""
    small = dict(BACKBONES["beit_tiny_32"].create_kwargs(), img_size=64, patch_size=8)
    torch.manual_seed(123)
    source = timm.create_model("beit_base_patch16_224", num_classes=1000, **small)
    state = dict(source.state_dict())
    indices = {
        f"{name}.relative_position_index": module.relative_position_index
        for name, module in source.named_modules()
        if getattr(module, "relative_position_index", None) is not None
    }
    assert len(indices) == 4  # one per block (not in timm's state dict: non-persistent)
    path = tmp_path / "beit_official.pth"
    torch.save({"model": {**state, **indices}}, path)

    loaded = build_model("beit_tiny_32", 3, checkpoint=str(path))
    new = loaded.state_dict()
    blocks = [k for k in state if k.startswith("blocks.")]
    assert close_state(new, state, blocks)
    # The 8x8 patch kernels are resampled to the model's 4x4 (same grid: 64/8 = 32/4).
    assert new["patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    # timm's pseudo-inverse resampling (FlexiViT): its own numbers, checked elsewhere.
    expected = resample_patch_embed(state["patch_embed.proj.weight"], (4, 4))
    torch.testing.assert_close(new["patch_embed.proj.weight"], expected)
    # The rebuilt model runs (its own relative position index is intact).
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(batch("beit_tiny_32", 2))).all()


def test_vit_position_embedding_of_another_grid_is_resampled(tmp_path):
    larger = dict(BACKBONES["vit_tiny_32"].create_kwargs(), img_size=64)  # a 16x16 grid
    torch.manual_seed(123)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **larger)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    loaded = build_model("vit_tiny_32", 3, checkpoint=str(path))
    assert loaded.pos_embed.shape == (1, 1 + 8 * 8, 96)
    # The cls token's position embedding is kept as it is; the grid is resized.
    assert torch.equal(loaded.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_timm_converters_leave_timm_layout_unchanged():
    for name in ("beit_tiny_32", "vit_tiny_32"):
        model = build_model(name, 3)
        state = model.state_dict()
        convert = sys.modules[type(model).__module__].checkpoint_filter_fn
        converted = convert(dict(state), model)
        assert converted.keys() == state.keys()
        assert close_state(converted, state, state)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("resnet18_32_pool", "beit_tiny_32"),
        ("vit_tiny_32", "beit_tiny_32"),
        ("beit_tiny_32", "vit_tiny_32"),
        ("resnet18_32_pool", "vit_tiny_32"),
        ("beit_tiny_32", "bit_s_r101x1"),
    ],
)
def test_checkpoint_of_another_architecture_is_an_error(source, target, tmp_path):
    path = tmp_path / f"{source}.pt"
    torch.save({"model": build_model(source, 3).state_dict()}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: does not fit backbone '{target}'")):
        build_model(target, 3, checkpoint=str(path))


def test_file_without_state_dict_is_an_error(tmp_path):
    path = tmp_path / "not_weights.pt"
    torch.save({"epoch": 3, "args": [1, 2]}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a state dict")):
        build_model("beit_tiny_32", 3, checkpoint=str(path))
    text = tmp_path / "notes.pt"
    text.write_text("not a torch file")
    with pytest.raises(ValueError, match=re.escape(f"{text}: cannot read a state dict")):
        build_model("vit_tiny_32", 3, checkpoint=str(text))
    with pytest.raises(FileNotFoundError):
        build_model("vit_tiny_32", 3, checkpoint=str(tmp_path / "missing.pt"))


# -- BiT's official .npz ------------------------------------------------------------------


def hwio(weight: torch.Tensor) -> np.ndarray:
    """OIHW (torch) -> HWIO (the JAX layout of the BiT release)."""
    return weight.detach().permute(2, 3, 1, 0).numpy()


def bit_to_npz(model: nn.Module, path) -> None:
    """Write a timm ResNetV2 in the layout of the BiT release's .npz (names per unit)."""
    p = "resnet/"
    out = {
        f"{p}root_block/standardized_conv2d/kernel": hwio(model.stem.conv.weight),
        f"{p}group_norm/gamma": model.norm.weight.detach().numpy(),
        f"{p}group_norm/beta": model.norm.bias.detach().numpy(),
        f"{p}head/conv2d/kernel": hwio(model.head.fc.weight),
        f"{p}head/conv2d/bias": model.head.fc.bias.detach().numpy(),
    }
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            unit = f"{p}block{i + 1}/unit{j + 1:02d}/"
            for letter, k in zip("abc", (1, 2, 3), strict=True):
                out[f"{unit}{letter}/standardized_conv2d/kernel"] = hwio(
                    getattr(block, f"conv{k}").weight
                )
                norm = getattr(block, f"norm{k}")
                out[f"{unit}{letter}/group_norm/gamma"] = norm.weight.detach().numpy()
                out[f"{unit}{letter}/group_norm/beta"] = norm.bias.detach().numpy()
            if block.downsample is not None:
                out[f"{unit}a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
    np.savez(path, **out)


def test_bit_loads_the_official_npz_layout(built, tmp_path):
    source = built("bit_s_r101x1")
    state = source.state_dict()
    path = tmp_path / "BiT-S-R101x1.npz"
    bit_to_npz(source, path)

    # A head of the same size is loaded too: the whole model is the source.
    same = build_model("bit_s_r101x1", NUM_CLASSES, checkpoint=str(path)).state_dict()
    assert close_state(same, state, state)
    # Another size: the body is loaded, the head is left as built (timm skips it).
    torch.manual_seed(7)
    other = build_model("bit_s_r101x1", 3, checkpoint=str(path)).state_dict()
    body = [k for k in state if not k.startswith("head.")]
    assert close_state(other, state, body)
    assert other["head.fc.weight"].shape == (3, 2048, 1, 1)

    broken = tmp_path / "broken.npz"
    np.savez(broken, **{"resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 64))})
    with pytest.raises(ValueError, match=re.escape(f"{broken}: does not fit backbone")):
        build_model("bit_s_r101x1", 3, checkpoint=str(broken))
    with pytest.raises(ValueError, match="takes no .npz weights"):
        build_model("beit_tiny_32", 3, checkpoint=str(path))


# -- training checkpoints: load_checkpoint and read_head ----------------------------------


@pytest.mark.parametrize("name", ["resnet18_32_pool", "bit_s_r101x1", *TINY])
def test_checkpoint_round_trip_and_head(built, name, tmp_path):
    model = built(name)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"backbone": name, "num_classes": NUM_CLASSES})
    loaded, meta = load_checkpoint(path)
    assert meta["backbone"] == name and not loaded.training
    # Nothing left on the meta device (BEiT's non-persistent buffers are recomputed).
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    for (key, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), key
    x = batch(name, 4)
    with torch.no_grad():
        feature, logits = features_and_logits(model, x)
        torch.testing.assert_close(loaded(x), logits, atol=1e-6, rtol=1e-6)

    head = read_head(path)
    weight, bias = classifier_weights(model)
    assert head.weight.shape == (NUM_CLASSES, WIDTH[name]) and head.bias.shape == (NUM_CLASSES,)
    np.testing.assert_array_equal(head.weight, weight.detach().double().numpy())
    np.testing.assert_array_equal(head.bias, bias.detach().double().numpy())
    # Applied to the feature as (K, D), the head gives the model's logits.
    np.testing.assert_allclose(head.logits(feature.double().numpy()), logits.numpy(), atol=1e-5)


def test_gradnorm_on_bit_conv_head(built):
    """BiT's classifier is a 1x1 conv: gradnorm differentiates the (K, D) view of it."""
    model = built("bit_s_r101x1")
    meta = {"backbone": "bit_s_r101x1", "num_classes": NUM_CLASSES, "settings": SETTINGS}
    net = Network(model, meta, device="cpu", batch_size=2)
    linear = net.classifier
    assert isinstance(linear, nn.Linear)
    assert linear.weight.data_ptr() == model.head.fc.weight.data_ptr()  # shared, not copied
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        feature, logits = features_and_logits(model, net.inputs(images))
    data = FeatureSet(
        index=np.arange(2),
        label=np.zeros(2, np.int64),
        logits=logits.numpy(),
        feature=feature.numpy(),
    )
    got = get_scorer("gradnorm", {"temperature": 1.0}).score(
        data, Extras(network=net, images=images)
    )
    # Independently: autograd of the loss w.r.t. the conv weight itself, per image.
    expected = []
    for row in feature:
        weight = model.head.fc.weight.detach().clone().requires_grad_(True)
        out = torch.nn.functional.conv2d(row.view(1, -1, 1, 1), weight, model.head.fc.bias)
        (-torch.log_softmax(out.flatten(1), dim=1).mean()).backward()
        expected.append(float(weight.grad.abs().sum()))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# -- trained tiny transformers: feature dumps and the gradient scorers --------------------


@pytest.fixture(scope="module")
def trained(tiny_digits, tmp_path_factory):
    """name -> checkpoint of a CE run (3 epochs on the tiny digits) of each tiny transformer."""
    out = tmp_path_factory.mktemp("tiny_transformers")
    settings = TrainSettings.from_dict(
        {"epochs": 3, "batch_size": 8, "lr": 0.02, "crop_padding": 0, **SETTINGS}
    )
    paths = {}
    for name in TINY:
        paths[name] = out / f"{name}.pt"
        train(
            tiny_digits,
            paths[name],
            out / f"{name}.csv",
            method="ce",
            backbone=name,
            settings=settings,
            seed=0,
            device="cpu",
            threads=1,
        )
    return paths


def test_beit_feature_dump(trained, tiny_digits, tmp_path):
    dump = extract(
        trained["beit_tiny_32"],
        tiny_digits,
        "test",
        tmp_path / "beit.parquet",
        role="id",
        batch_size=5,
        device="cpu",
    )
    images, labels, index = load_images(tiny_digits, split="test")
    np.testing.assert_array_equal(dump.index, index)
    np.testing.assert_array_equal(dump.label, labels)
    assert dump.metadata["backbone"] == "beit_tiny_32"
    assert dump.feature.shape == (12, 96) and dump.logits.shape == (12, 3)
    # Recomputed with timm alone: mean patch token, fc_norm, the linear head.
    blob = torch.load(trained["beit_tiny_32"], weights_only=True)
    spec = BACKBONES["beit_tiny_32"]
    model = timm.create_model(spec.timm_name, num_classes=3, **spec.create_kwargs()).eval()
    model.load_state_dict(blob["model"])
    with torch.no_grad():
        tokens = model.forward_features(to_model_input(images, **SETTINGS))
        feature = model.fc_norm(tokens[:, 1:].mean(dim=1))
        logits = model.head(feature)
    np.testing.assert_allclose(dump.feature, feature.numpy(), atol=1e-5)
    np.testing.assert_allclose(dump.logits, logits.numpy(), atol=1e-5)
    # No multi-scale views from tokens: a clear error, no file.
    with pytest.raises(ValueError, match="backbone 'beit_tiny_32' has no spatial"):
        extract(
            trained["beit_tiny_32"],
            tiny_digits,
            "test",
            tmp_path / "views.parquet",
            role="id",
            device="cpu",
            views=True,
        )
    assert not (tmp_path / "views.parquet").exists()


def gradnorm_closed_form(feature, logits, temperature):
    """|d CE(uniform, softmax(z / T)) / dW|_1 = |softmax - 1/C|_1 / T * |feature|_1."""
    z = logits.astype(np.float64) / temperature
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return (
        np.abs(prob - 1.0 / z.shape[1]).sum(axis=1)
        / temperature
        * np.abs(feature.astype(np.float64)).sum(axis=1)
    )


def odin_one_image(model, x, temperature, eps, std):
    """ODIN for one image, plainly: a signed step down the CE to the predicted class."""
    x = x.clone().requires_grad_(True)
    logits = model(x) / temperature
    torch.nn.functional.cross_entropy(logits, logits.argmax(dim=1)).backward()
    x_new = x.detach() - eps * torch.sign(x.grad) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return float(torch.softmax(model(x_new).double() / temperature, dim=1).max())


@pytest.mark.parametrize("name", TINY)
def test_gradient_scorers_on_transformers(trained, tiny_digits, name):
    net = Network.from_checkpoint(trained[name], device="cpu", batch_size=5, threads=1)
    reference, _ = load_checkpoint(trained[name])
    images = load_images(tiny_digits, split="test")[0]
    extras = Extras(network=net, images=images)
    data = extract_rows(reference, images)

    temperature = 2.0
    got = get_scorer("gradnorm", {"temperature": temperature}).score(data, extras)
    np.testing.assert_allclose(
        got, gradnorm_closed_form(data.feature, data.logits, temperature), rtol=1e-5
    )

    eps = 0.01
    odin = get_scorer("odin", {"temperature": temperature, "eps": eps}).score(data, extras)
    x = to_model_input(images, **SETTINGS)
    expected = [
        odin_one_image(reference, x[i : i + 1], temperature, eps, SETTINGS["std"])
        for i in range(len(images))
    ]
    np.testing.assert_allclose(odin, expected, rtol=1e-5)
    plain = get_scorer("odin", {"temperature": temperature, "eps": 0}).score(data, extras)
    assert np.all(odin > plain)  # the step is not a no-op


def extract_rows(model, images):
    """A FeatureSet of the images' features and logits (what a dump would hold)."""
    with torch.no_grad():
        feature, logits = features_and_logits(model, to_model_input(images, **SETTINGS))
    n = len(images)
    return FeatureSet(
        index=np.arange(n, dtype=np.int64),
        label=np.zeros(n, np.int64),
        logits=logits.numpy(),
        feature=feature.numpy(),
    )
