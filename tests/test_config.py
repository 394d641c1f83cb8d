"""Config validation: each bad config stops at parse time with the key named."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ood.config import ConfigError, train_settings, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
TINY = yaml.safe_load((REPO / "tests/fixtures/tiny.yaml").read_text())


def bad(mutate) -> dict:
    config = copy.deepcopy(TINY)
    mutate(config)
    return config


def bench(config: dict) -> dict:
    return config["benchmarks"]["tiny"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(epochs=3), r"config \(top level\): .*'epochs' was unexpected"),
        (
            lambda c: bench(c)["train"].update(epocs=3),
            r"config benchmarks\.tiny\.train: .*'epocs' was unexpected",
        ),
        (
            lambda c: bench(c)["train"].update(lr="fast"),
            r"config benchmarks\.tiny\.train\.lr: 'fast' is not of type 'number'",
        ),
        (lambda c: bench(c).update(seeds="0"), r"config benchmarks\.tiny\.seeds: '0' is not"),
        (lambda c: c.update(device="tpu"), r"config device: 'tpu' is not one of"),
        (
            lambda c: c.update(downloads={"svhn": {"url": "http://x/a.mat", "sha256": "a" * 64}}),
            r"downloads\.svhn: download 'svhn': cannot infer the format of 'a\.mat'",
        ),
        (
            lambda c: c.update(downloads={"svhn": {"url": "http://x/a.mat"}}),
            r"config downloads\.svhn: .* is not valid under any of the given schemas",
        ),
        (
            lambda c: c["datasets"]["noise"].update(inputs={"archive": "nowhere"}),
            r"datasets\.noise\.inputs\.archive: 'nowhere' is not in downloads",
        ),
        (lambda c: bench(c).pop("scorers"), r"config benchmarks\.tiny: 'scorers' is a required"),
        (
            lambda c: c["datasets"]["noise"].update(source="gaussian"),
            r"datasets\.noise\.source: unknown source 'gaussian'; known: .*gaussian_noise",
        ),
        (
            lambda c: bench(c).update(id_dataset="digits"),
            r"benchmarks\.tiny\.id_dataset: 'digits' is not in datasets",
        ),
        (
            lambda c: bench(c)["ood"]["far"].append("svhn"),
            r"benchmarks\.tiny\.ood\.far: 'svhn' is not in datasets",
        ),
        (
            lambda c: bench(c)["ood"]["far"].append("digits_34"),
            r"benchmarks\.tiny\.ood\.far: 'digits_34' is already in ood\.near",
        ),
        (
            lambda c: bench(c)["ood"]["near"].append("digits_012"),
            r"'digits_012' is already in id_dataset",
        ),
        (
            lambda c: bench(c).update(backbone="resnet19"),
            r"benchmarks\.tiny\.backbone: unknown backbone 'resnet19'; known: .*resnet18_32",
        ),
        (
            lambda c: bench(c)["methods"].update(supcom={}),
            r"benchmarks\.tiny\.methods: unknown method 'supcom'; known: ce",
        ),
        (
            lambda c: bench(c)["scorers"].update(knm={}),
            r"benchmarks\.tiny\.scorers\.knm: unknown scorer 'knm'; known: .*knn",
        ),
        (
            lambda c: bench(c)["scorers"].update(knn={"k": 0}),
            r"benchmarks\.tiny\.scorers\.knn: .*'k' must be an integer >= 1, got 0",
        ),
        (
            lambda c: bench(c)["scorers"].update(energy={"temp": 1}),
            r"benchmarks\.tiny\.scorers\.energy: .*unknown parameter\(s\) 'temp'",
        ),
        (
            lambda c: bench(c)["scorers"].update(knn={"k": [10, 0]}),
            r"benchmarks\.tiny\.scorers\.knn: .*'k' must be an integer >= 1, got 0",
        ),
        (
            lambda c: bench(c)["scorers"].update(knn={"k": []}),
            r"benchmarks\.tiny\.scorers\.knn: parameter 'k': an empty list is an empty grid",
        ),
        (
            lambda c: bench(c)["scorers"].update(knn={"k": [5, 5]}),
            r"benchmarks\.tiny\.scorers\.knn: parameter 'k': the grid \[5, 5\] repeats",
        ),
        (
            lambda c: bench(c)["scorers"].update(mos={}),
            r"benchmarks\.tiny\.scorers\.mos: runs on none of the benchmark's methods "
            r"\(ce: applies to group-softmax models \(method mos\) only\)",
        ),
        (
            lambda c: bench(c)["methods"].update(mood={}),
            r"benchmarks\.tiny\.methods\.mood: masks patch tokens, which backbone "
            r"'resnet18_32_pool' does not have; give methods\.mood\.backbone a BEiT/ViT",
        ),
        (
            lambda c: bench(c)["methods"].update(mode_t={"backbone": "beit_tiny_32"}),
            r"benchmarks\.tiny\.methods\.mode_t: trains on the last feature map, which "
            r"backbone 'beit_tiny_32' does not have",
        ),
        (
            lambda c: bench(c)["methods"].update(ce={"backbone": "resnet99"}),
            r"benchmarks\.tiny\.methods\.ce\.backbone: unknown backbone 'resnet99'",
        ),
        (
            lambda c: bench(c)["methods"].update(mode_f={"init": "supcon"}),
            r"benchmarks\.tiny\.methods\.mode_f\.init: 'supcon' is not a method of this benchmark",
        ),
        (
            lambda c: bench(c)["methods"].update(mode_f={"init": "mode_f"}),
            r"methods\.mode_f\.init: 'mode_f' cannot start from or learn from itself",
        ),
        (
            lambda c: bench(c)["methods"].update(
                mode_f={"init": "mode_t"}, mode_t={"init": "mode_f"}
            ),
            r"benchmarks\.tiny\.methods: models depend on each other in a cycle: "
            r"mode_f -> mode_t -> mode_f",
        ),
        (
            lambda c: bench(c)["methods"].update(mood={"backbone": "beit_tiny_32", "init": "ce"}),
            r"methods\.mood\.init: 'ce' trains backbone 'resnet18_32_pool', 'mood' trains "
            r"'beit_tiny_32'",
        ),
        (
            lambda c: bench(c)["methods"].update(
                mode_f={"init": "ce", "train": {"pretrained": "w.pth"}}
            ),
            r"methods\.mode_f\.init: give init or train\.pretrained, not both",
        ),
        (
            lambda c: (
                c["datasets"].update(aux={"source": "gaussian_noise"}),
                bench(c)["methods"].update(oaml={"outliers": "aux"}),
            ),
            r"methods\.oaml\.teacher: method 'oaml' distils from a teacher; name a method",
        ),
        (
            lambda c: bench(c)["methods"].update(mode_t={"teacher": "ce"}),
            r"methods\.mode_t\.teacher: method 'mode_t' takes no teacher",
        ),
        (
            lambda c: (
                c["datasets"].update(aux={"source": "gaussian_noise"}),
                bench(c)["methods"].update(
                    oaml={"outliers": "aux", "teacher": {"checkpoint": "t.pth", "backbone": "vit"}}
                ),
            ),
            r"methods\.oaml\.teacher\.backbone: unknown backbone 'vit'",
        ),
        (
            lambda c: bench(c)["methods"].update(supcon={"train": {"method_params": {"tau": 1}}}),
            r"benchmarks\.tiny\.methods\.supcon\.train\.method_params: unknown parameter\(s\) "
            r"tau of method 'supcon'; known: temperature, feature_dim, ce_weight",
        ),
        (
            lambda c: bench(c)["methods"]["ce"].update(scorers=["nope"]),
            r"methods\.ce\.scorers: 'nope' is not one of the benchmark's scorers",
        ),
        (
            lambda c: (
                bench(c)["scorers"].update(mos={}),
                bench(c)["methods"]["ce"].update(scorers=["mos"]),
            ),
            r"methods\.ce\.scorers: 'mos' applies to group-softmax models \(method mos\) only",
        ),
        (
            lambda c: (
                bench(c)["scorers"].update(csd={}),
                bench(c).update(backbone="beit_tiny_32"),
            ),
            r"scorers\.csd: runs on none of the benchmark's methods \(ce: needs multi-scale "
            r"views of a feature map, which backbone 'beit_tiny_32' lacks\)",
        ),
        (
            lambda c: bench(c)["methods"].update(oe={}),
            r"benchmarks\.tiny\.methods\.oe\.outliers: method 'oe' trains on an auxiliary "
            r"outlier set; name a dataset",
        ),
        (
            lambda c: bench(c)["methods"].update(oe={"outliers": "nope"}),
            r"benchmarks\.tiny\.methods\.oe\.outliers: 'nope' is not in datasets",
        ),
        (
            lambda c: bench(c)["methods"].update(oe={"outliers": "noise"}),
            r"benchmarks\.tiny\.methods\.oe\.outliers: 'noise' is the benchmark's ood\.far",
        ),
        (
            lambda c: bench(c)["methods"].update(oe={"outliers": "digits_012"}),
            r"methods\.oe\.outliers: 'digits_012' is the benchmark's id_dataset",
        ),
        (
            lambda c: bench(c)["methods"].update(ce={"outliers": "noise"}),
            r"benchmarks\.tiny\.methods\.ce\.outliers: method 'ce' trains on no outlier set",
        ),
        (
            lambda c: bench(c).update(synthesis={"noise": {"pipeline": "tiny"}}),
            r"benchmarks\.tiny\.synthesis\.noise: 'noise' is also a dataset",
        ),
        (
            lambda c: bench(c).update(
                synthesis={"dream": {"pipeline": "tiny", "sample": {"template": "a photo"}}}
            ),
            r"synthesis\.dream\.sample\.template: 'a photo' must contain \{\} exactly once",
        ),
        (
            lambda c: bench(c).update(
                synthesis={"dream": {"pipeline": "tiny", "embed": {"keep": 80, "pool": 40}}}
            ),
            r"synthesis\.dream\.embed\.keep: 80 exceeds pool \(40\)",
        ),
        (
            lambda c: bench(c).update(synthesis={"dream": {"pipeline": "tiny", "embed": {"K": 3}}}),
            r"config benchmarks\.tiny\.synthesis\.dream\.embed: .*'K' was unexpected",
        ),
        (
            lambda c: bench(c).update(synthesis={"dream": {"shards": 2}}),
            r"synthesis\.dream: 'pipeline' is a required property",
        ),
        (
            lambda c: bench(c).update(
                synthesis={"dream": {"pipeline": "tiny", "sample": {"resolution": 100}}}
            ),
            r"synthesis\.dream\.sample\.resolution: 100 is not a multiple of 8",
        ),
    ],
)
def test_bad_config_names_the_key(mutate, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        validate_config(bad(mutate), SCHEMA)


def test_good_config_gets_defaults():
    config = copy.deepcopy(TINY)
    del bench(config)["seeds"]
    validate_config(config, SCHEMA)
    assert bench(config)["seeds"] == [0]
    assert bench(config)["features"] == {"batch_size": 256}
    assert config["datasets"]["noise"]["params"] == {"n": 10}


def test_method_overrides_benchmark_training_settings():
    config = copy.deepcopy(TINY)
    bench(config)["methods"]["ce"] = {"train": {"lr": 0.2}}
    validate_config(config, SCHEMA)
    assert train_settings(bench(config), "ce") == {"epochs": 2, "batch_size": 8, "lr": 0.2}


def test_snakemake_stops_at_parse_time_and_writes_nothing(tmp_path):
    for name in ("Snakefile", "workflow", "config"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    config = bad(lambda c: bench(c)["train"].update(epocs=3))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "config benchmarks.tiny.train: Additional properties are not allowed ('epocs'" in (
        result.stdout + result.stderr
    )
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_scorers_needing_views_need_a_spatial_backbone(monkeypatch):
    """csd reads views of the last feature map: a backbone without one is a parse-time error."""
    import dataclasses

    from ood.models import specs

    flat = dataclasses.replace(specs.BACKBONES["resnet18_32_pool"], spatial=False)
    monkeypatch.setitem(specs.BACKBONES, "pooled_only", flat)
    config = bad(lambda c: bench(c).update(backbone="pooled_only"))
    bench(config)["scorers"].pop("csd")
    validate_config(copy.deepcopy(config), SCHEMA)  # fine without csd
    bench(config)["scorers"]["csd"] = {}
    with pytest.raises(
        ConfigError, match=r"scorers\.csd: runs on none .* needs multi-scale views .* 'pooled_only'"
    ):
        validate_config(config, SCHEMA)
    # ALPA (mode_t, mode_f) reads the same map.
    bench(config)["scorers"].pop("csd")
    bench(config)["methods"]["mode_t"] = {}
    with pytest.raises(
        ConfigError, match=r"methods\.mode_t: trains on the last feature map, .* 'pooled_only'"
    ):
        validate_config(config, SCHEMA)


def test_scorer_applies_to_some_methods_only(monkeypatch):
    """With a flat (ce) and a group (mos-like) method, msp and mos each apply to one of them."""
    from ood import train

    monkeypatch.setitem(train.METHODS, "groupy", "ood.train.ce:CrossEntropy")
    monkeypatch.setitem(train.METHOD_HEADS, "groupy", "group")
    monkeypatch.setitem(train.METHOD_PARAMS, "groupy", ())
    config = copy.deepcopy(TINY)
    bench(config)["methods"]["groupy"] = {}
    bench(config)["scorers"]["mos"] = {}
    validate_config(config, SCHEMA)  # msp has ce, mos has groupy: both apply somewhere


def test_methods_train_on_a_synthesised_set_and_real_pipelines_are_user_files():
    from ood.config import synthesis_pipeline, user_files

    config = copy.deepcopy(TINY)
    bench(config)["synthesis"] = {
        "dream": {"pipeline": "tiny"},
        "sd": {"pipeline": "data/weights/sd-v1-4/", "shards": 4},
    }
    bench(config)["methods"]["oe"] = {"outliers": "sd"}
    validate_config(config, SCHEMA)
    assert bench(config)["synthesis"]["dream"] == {
        "pipeline": "tiny",
        "shards": 1,
        "embed": {},
        "sample": {},
    }
    assert synthesis_pipeline(bench(config)["synthesis"]["dream"]) == "resources/pipelines/tiny_sd"
    assert user_files(bench(config)) == ["data/weights/sd-v1-4"]
