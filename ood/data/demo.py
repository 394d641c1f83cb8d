"""Offline image sources for the embedded demo benchmark, and the source registry.

Every demo source uses only data that installed packages ship (scikit-learn's
digits and sample images, scikit-image's bundled textures and photos), so
the demo runs without network access.

A source is a function `(params, inputs) -> iterator of (split, label, image)`
where `image` is an HxWx3 uint8 array or the `Path` of an encoded image file,
and `inputs` maps input roles to directories the download stage produced.
It resolves its parameters against `DEFAULTS`, and validates them and its
inputs before yielding anything. Demo sources take no inputs.

`SOURCES`, `DEFAULTS` and `INPUTS` (the input roles of each source) are the
one registry: the demo sources here and the real-dataset readers of
`ood.data.real`, merged at the end of this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
from PIL import Image

from ood.data import real, subset

Record = real.Record  # (split, label, HxWx3 uint8 array or Path of an image file)
Inputs = real.Inputs  # input role -> directory
Source = Callable[[dict[str, Any], Inputs | None], Iterator[Record]]

TEXTURES = ("brick", "grass", "gravel")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
# Bundled scikit-image pictures that no demo test set uses: crops of them are the
# demo's auxiliary outlier set (a stand-in for TinyImages-300K).
SCENES = (
    "camera",
    "coins",
    "moon",
    "checkerboard",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "clock",
    "cell",
    "colorwheel",
)

_DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "sklearn_digits": {
        "classes": None,  # required
        "image_size": 32,
        "train_fraction": 0.7,
        "seed": 0,
        "max_per_class": None,
    },
    "skimage_textures": {
        "names": list(TEXTURES),
        "per_image": 150,
        "crop_min": 48,
        "crop_max": 128,
        "image_size": 32,
        "seed": 0,
    },
    "sample_photos": {
        "names": list(PHOTOS),
        "per_image": 60,
        "crop_min": 48,
        "crop_max": 160,
        "image_size": 32,
        "seed": 0,
    },
    "skimage_scenes": {
        "names": list(SCENES),
        "per_image": 40,
        "crop_min": 32,
        "crop_max": 128,
        "image_size": 32,
        "seed": 0,
    },
    "gaussian_noise": {"n": 300, "mean": 0.5, "std": 0.25, "image_size": 32, "seed": 0},
}


def resolve_params(source: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`params` merged over the source's defaults; unknown sources or keys are errors."""
    if source not in DEFAULTS:
        raise ValueError(f"unknown source {source!r}; allowed: {', '.join(DEFAULTS)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS[source]))
    if unknown:
        allowed = ", ".join(DEFAULTS[source])
        raise ValueError(f"{source}: unknown param(s) {', '.join(unknown)}; allowed: {allowed}")
    return copy.deepcopy({**DEFAULTS[source], **params})  # callers may mutate lists


def _no_inputs(source: str, inputs: Mapping[str, Any] | None) -> None:
    if inputs:
        roles = ", ".join(map(str, inputs))
        raise ValueError(f"{source}: a demo source takes no inputs, got {roles}")


def _int(source: str, key: str, value: Any, minimum: int = 1) -> int:
    # bool is an Integral too, but `n: true` in YAML is a mistake, not 1.
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        kind = "a positive" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{source}: param {key!r} must be {kind} int, got {value!r}")
    return int(value)


def _float(source: str, key: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{source}: param {key!r} must be a number in [{low}, {high}]")
    return float(value)


def _names(source: str, names: Any, allowed: tuple[str, ...]) -> list[str]:
    if isinstance(names, str) or not names:
        raise ValueError(f"{source}: param 'names' must be a non-empty list of {allowed}")
    for name in names:
        if name not in allowed:
            raise ValueError(f"{source}: unknown image {name!r}; allowed: {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: 'names' has duplicates: {list(names)}")
    return list(names)


def _resize_rgb(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to size x size, grayscale replicated to 3 channels."""
    if gray_or_rgb.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(gray_or_rgb), mode="L")
    else:  # drop an alpha channel if there is one
        image = Image.fromarray(np.ascontiguousarray(gray_or_rgb[:, :, :3]), mode="RGB")
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"))


def sklearn_digits(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """Digits `classes` relabelled 0..K-1 in that order, split stratified by `seed`."""
    src = "sklearn_digits"
    _no_inputs(src, inputs)
    p = resolve_params(src, params)
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    classes = p["classes"]
    if (
        isinstance(classes, str)
        or not classes
        or any(not isinstance(c, Integral) or not 0 <= c <= 9 for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(f"{src}: param 'classes' must be a list of distinct digits 0-9")
    size = _int(src, "image_size", p["image_size"])
    fraction = _float(src, "train_fraction", p["train_fraction"], 0.0, 1.0)
    seed = _int(src, "seed", p["seed"], minimum=0)
    cap = None if p["max_per_class"] is None else _int(src, "max_per_class", p["max_per_class"])

    digits = load_digits()
    # The first `cap` of each class in dataset order: a fixed subset for any seed.
    chosen = np.concatenate([np.flatnonzero(digits.target == c)[:cap] for c in classes])
    chosen.sort()
    labels = np.array([list(classes).index(d) for d in digits.target[chosen]])
    if fraction in (0.0, 1.0):  # train_test_split rejects an empty side
        train = chosen if fraction == 1.0 else chosen[:0]
    else:
        train, _ = train_test_split(chosen, train_size=fraction, stratify=labels, random_state=seed)
    in_train = np.isin(chosen, train)

    def generate() -> Iterator[Record]:
        for split, mask in (("train", in_train), ("test", ~in_train)):
            for i, label in zip(chosen[mask], labels[mask], strict=True):
                pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                yield split, int(label), _resize_rgb(pixels, size)

    return generate()


def _random_crops(
    src: str, images: dict[str, Callable[[], np.ndarray]], p: dict[str, Any]
) -> Iterator[Record]:
    """`per_image` random square crops of each named image, label = position in names."""
    names = _names(src, p["names"], tuple(images))
    per_image = _int(src, "per_image", p["per_image"])
    lo, hi = _int(src, "crop_min", p["crop_min"]), _int(src, "crop_max", p["crop_max"])
    if lo > hi:
        raise ValueError(f"{src}: crop_min ({lo}) must be <= crop_max ({hi})")
    size = _int(src, "image_size", p["image_size"])
    seed = _int(src, "seed", p["seed"], minimum=0)
    loaded = [images[name]() for name in names]
    for name, pixels in zip(names, loaded, strict=True):
        if hi > min(pixels.shape[:2]):
            raise ValueError(f"{src}: crop_max {hi} exceeds image {name!r} {pixels.shape[:2]}")

    def generate() -> Iterator[Record]:
        rng = np.random.default_rng(seed)
        for label, pixels in enumerate(loaded):
            height, width = pixels.shape[:2]
            for _ in range(per_image):
                side = int(rng.integers(lo, hi + 1))
                top = int(rng.integers(0, height - side + 1))
                left = int(rng.integers(0, width - side + 1))
                crop = pixels[top : top + side, left : left + side]
                yield "test", label, _resize_rgb(crop, size)

    return generate()


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data  # bundled files only: these names need no download

        return getattr(skimage.data, name)()

    return load


def _sklearn_sample(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def skimage_textures(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """Random crops of scikit-image's grayscale textures (far-OOD)."""
    _no_inputs("skimage_textures", inputs)
    images = {name: _skimage(name) for name in TEXTURES}
    return _random_crops("skimage_textures", images, resolve_params("skimage_textures", params))


def sample_photos(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """Random crops of natural photos from scikit-image and scikit-learn (far-OOD)."""
    _no_inputs("sample_photos", inputs)
    images = {name: _skimage(name) for name in PHOTOS[:4]}
    images |= {"china": _sklearn_sample("china.jpg"), "flower": _sklearn_sample("flower.jpg")}
    return _random_crops("sample_photos", images, resolve_params("sample_photos", params))


def skimage_scenes(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """Random crops of other scikit-image pictures (the demo's auxiliary outliers)."""
    _no_inputs("skimage_scenes", inputs)
    images = {name: _skimage(name) for name in SCENES}
    return _random_crops("skimage_scenes", images, resolve_params("skimage_scenes", params))


def gaussian_noise(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """I.i.d. N(mean, std) per pixel and channel, clipped to [0, 1] (far-OOD)."""
    src = "gaussian_noise"
    _no_inputs(src, inputs)
    p = resolve_params(src, params)
    n, size = _int(src, "n", p["n"]), _int(src, "image_size", p["image_size"])
    seed = _int(src, "seed", p["seed"], minimum=0)
    mean = _float(src, "mean", p["mean"], 0.0, 1.0)
    std = _float(src, "std", p["std"], 0.0, float("inf"))

    def generate() -> Iterator[Record]:
        rng = np.random.default_rng(seed)
        for _ in range(n):
            values = np.clip(rng.normal(mean, std, size=(size, size, 3)), 0.0, 1.0)
            yield "test", 0, np.round(values * 255.0).astype(np.uint8)

    return generate()


_DEMO_SOURCES: dict[str, Source] = {
    "sklearn_digits": sklearn_digits,
    "skimage_textures": skimage_textures,
    "sample_photos": sample_photos,
    "skimage_scenes": skimage_scenes,
    "gaussian_noise": gaussian_noise,
}

# The registry, merged here and nowhere else.
if set(_DEMO_SOURCES) & set(real.SOURCES):
    raise RuntimeError(f"sources defined twice: {set(_DEMO_SOURCES) & set(real.SOURCES)}")
SOURCES: dict[str, Source] = {
    **_DEMO_SOURCES,
    **real.SOURCES,
    "class_subset": subset.class_subset,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    **_DEMO_DEFAULTS,
    **real.DEFAULTS,
    "class_subset": subset.DEFAULTS,
}
INPUTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_DEMO_SOURCES, ()),
    **real.INPUTS,
    "class_subset": subset.INPUTS,
}
if not set(SOURCES) == set(DEFAULTS) == set(INPUTS):
    raise RuntimeError("SOURCES, DEFAULTS and INPUTS name different sources")


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; allowed: {', '.join(SOURCES)}")
    return SOURCES[name]
