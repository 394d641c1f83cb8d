"""Shared session fixtures: tiny curated datasets and one tiny trained model.

torch and the training code are imported inside the fixtures, so test
modules that never ask for them do not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_BACKBONE = "resnet18_32_pool"  # the cheapest backbone (2x2 final map at 32x32)
TINY_DIGITS_SPEC = {
    "source": "sklearn_digits",
    "params": {"classes": [0, 1, 2], "max_per_class": 8, "train_fraction": 0.5},
}
# lr 0.02 without crop augmentation: the loss drops clearly within 3 epochs on 12 images.
TINY_TRAIN_SETTINGS = {"epochs": 3, "batch_size": 8, "lr": 0.02, "crop_padding": 0}
TINY_SEED = 0


@dataclass(frozen=True)
class TinyModel:
    dataset: Path
    checkpoint: Path
    log: Path
    meta: dict
    settings: object  # ood.train.loop.TrainSettings


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> Path:
    """Digits 0, 1, 2 at 32x32: 12 train + 12 test images (train rows first)."""
    from ood.data.curate import curate

    out = tmp_path_factory.mktemp("tiny_data") / "tiny_digits"
    curate("tiny_digits", TINY_DIGITS_SPEC, out)
    return out


@pytest.fixture(scope="session")
def tiny_digits_16(tmp_path_factory) -> Path:
    """The same digits at 16x16: the wrong input size for every 32x32 backbone."""
    from ood.data.curate import curate

    spec = {"source": "sklearn_digits", "params": {**TINY_DIGITS_SPEC["params"], "image_size": 16}}
    out = tmp_path_factory.mktemp("tiny_data") / "tiny_digits_16"
    curate("tiny_digits_16", spec, out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_digits, tmp_path_factory) -> TinyModel:
    """One CE model trained once per session on `tiny_digits` (CPU, 1 thread)."""
    from ood.train.loop import TrainSettings, train

    out = tmp_path_factory.mktemp("tiny_model")
    settings = TrainSettings.from_dict(TINY_TRAIN_SETTINGS)
    meta = train(
        tiny_digits,
        out / "model.pt",
        out / "train_log.csv",
        method="ce",
        backbone=TINY_BACKBONE,
        settings=settings,
        seed=TINY_SEED,
        device="cpu",
        threads=1,
    )
    return TinyModel(tiny_digits, out / "model.pt", out / "train_log.csv", meta, settings)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The whole workflow on tests/fixtures/tiny.yaml, run once per session.

    Tests only read it or dry-run against it (test_workflow, test_reruns).
    """
    from test_workflow import copy_workflow, snakemake

    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    result = snakemake(workdir, "results/tables/all.csv", "--configfile", "config/tiny.yaml")
    return workdir, result


@pytest.fixture(scope="session")
def noise_outliers(tmp_path_factory):
    """20 Gaussian-noise images at 32x32: a tiny auxiliary outlier set."""
    from ood.data.curate import curate

    out = tmp_path_factory.mktemp("outliers") / "noise"
    curate("noise", {"source": "gaussian_noise", "params": {"n": 20, "seed": 5}}, out)
    return out
