"""MOOD's one-class protocol: a benchmark option that expands into one benchmark per
class, whose ID and near-OOD sets are subsets of the curated ID dataset."""

from __future__ import annotations

import copy

import pytest
import yaml
from test_config import SCHEMA, TINY
from test_workflow import copy_workflow, planned_jobs, snakemake

from ood.config import ConfigError, validate_config
from ood.data.curate import curate
from ood.data.manifest import read_manifest
from ood.data.subset import class_subset


def one_class_config(classes=(0, 2)) -> dict:
    config = copy.deepcopy(TINY)
    config["benchmarks"]["tiny"]["one_class"] = list(classes)
    return config


def test_one_class_expands_into_a_benchmark_per_class():
    config = one_class_config()
    validate_config(config, SCHEMA)
    assert set(config["benchmarks"]) == {"tiny_class0", "tiny_class2"}
    bench = config["benchmarks"]["tiny_class2"]
    assert bench["id_dataset"] == "digits_012_class2"
    assert bench["ood"] == {"near": ["digits_012_not2"], "far": ["textures", "noise"]}
    assert config["datasets"]["digits_012_class2"] == {
        "source": "class_subset",
        "params": {"of": "digits_012", "classes": [2]},
    }
    assert config["datasets"]["digits_012_not2"]["params"] == {
        "of": "digits_012",
        "exclude": [2],
        "splits": ["test"],
        "relabel": False,
    }
    # Everything else is the original benchmark's.
    assert bench["methods"] == TINY["benchmarks"]["tiny"]["methods"]
    assert bench["scorers"] == TINY["benchmarks"]["tiny"]["scorers"]


def test_one_class_name_clash_is_an_error():
    config = one_class_config()
    config["datasets"]["digits_012_class0"] = {"source": "gaussian_noise"}
    with pytest.raises(ConfigError, match=r"one_class: dataset 'digits_012_class0' exists"):
        validate_config(config, SCHEMA)


def test_class_subset_selects_relabels_and_copies_the_bytes(tiny_digits, tmp_path):
    parent = read_manifest(tiny_digits)
    inside = tmp_path / "class2"
    curate(
        "class2",
        {"source": "class_subset", "params": {"of": "x", "classes": [2]}},
        inside,
        inputs={"dataset": tiny_digits},
    )
    rows = read_manifest(inside)
    expected = [r for r in parent if r.label == 2]
    assert len(rows) == len(expected) > 0
    assert {r.label for r in rows} == {0}  # the one class becomes class 0
    assert sorted(r.sha256 for r in rows) == sorted(r.sha256 for r in expected)
    assert sorted(r.split for r in rows) == sorted(r.split for r in expected)

    outside = tmp_path / "not2"
    spec = {"of": "x", "exclude": [2], "splits": ["test"], "relabel": False}
    curate(
        "not2", {"source": "class_subset", "params": spec}, outside, inputs={"dataset": tiny_digits}
    )
    rows = read_manifest(outside)
    expected = [r for r in parent if r.label != 2 and r.split == "test"]
    assert sorted((r.label, r.sha256) for r in rows) == sorted(
        (r.label, r.sha256) for r in expected
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"classes": [7]}, r"class\(es\) \[7\] not in"),
        ({"classes": "2"}, r"param 'classes' must be a list of class ids"),
        ({"classes": [1], "exclude": [1]}, r"no class of .* is left to keep"),
        ({"splits": ["val"]}, r"param 'splits' must list some of"),
    ],
)
def test_class_subset_errors_name_the_problem(tiny_digits, tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        list(
            class_subset(
                {
                    **{
                        "of": "x",
                        "classes": None,
                        "exclude": [],
                        "splits": ["train"],
                        "relabel": True,
                    },
                    **params,
                },
                {"dataset": tiny_digits},
            )
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.workflow
def test_workflow_plans_and_curates_the_one_class_sets(tmp_path):
    workdir = copy_workflow(tmp_path)
    config = one_class_config(classes=(1,))
    (workdir / "config/one.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "results/tables/all.csv", "-n", "--configfile", "config/one.yaml")
    counts = planned_jobs(result.stdout)
    # digits_012 + its two subsets + textures + noise (digits_34 is not used any more).
    assert counts["curate_dataset"] == 5 and counts["train"] == 1
    snakemake(
        workdir, "resources/data/digits_012_not1/manifest.csv", "--configfile", "config/one.yaml"
    )
    rows = read_manifest(workdir / "resources/data/digits_012_not1")
    parent = read_manifest(workdir / "resources/data/digits_012")
    assert {r.split for r in rows} == {"test"} and 1 not in {r.label for r in rows}
    assert len(rows) == sum(r.split == "test" and r.label != 1 for r in parent)
