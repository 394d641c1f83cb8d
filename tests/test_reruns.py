"""Partial reruns, checked on the jobs Snakemake plans (dry runs), not exit codes.

A two-benchmark, two-seed variant of tests/fixtures/tiny.yaml on an empty
results folder: asking for one score (a model's scorer variant: a folder
with one file per scored set), one model or one benchmark's table
plans exactly the jobs that target needs. On a finished run, `--forcerun` of
one training job replans its downstream and nothing upstream.
"""

from __future__ import annotations

import re

import pytest
import yaml
from test_workflow import OOD, VARIANTS, copy_workflow, planned_jobs, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def two_benchmarks(tmp_path_factory):
    """tiny with seeds 0 and 1, plus `small`: same ID set, one OOD set, two scorers."""
    workdir = copy_workflow(tmp_path_factory.mktemp("reruns"))
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    tiny = config["benchmarks"]["tiny"]
    tiny["seeds"] = [0, 1]
    config["benchmarks"]["small"] = {
        **tiny,
        "ood": {"far": ["noise"]},
        "seeds": [0],
        "scorers": {"msp": {}, "knn": {"k": 3}},
    }
    (workdir / "config/two.yaml").write_text(yaml.safe_dump(config))
    return workdir


def dry_run(workdir, *args: str) -> tuple[dict[str, int], set[str]]:
    """Planned rule counts and output paths of `snakemake -n ARGS`."""
    result = snakemake(workdir, "-n", *args)
    outputs = set(re.findall(r"^\s+output: (.+)$", result.stdout, flags=re.M))
    return planned_jobs(result.stdout), {p for line in outputs for p in line.split(", ")}


def test_one_score_plans_its_chain_only(two_benchmarks):
    """One scorer variant of one model: it scores every set of its benchmark."""
    target = "results/scores/tiny/ce/seed1/knn-k3"
    counts, outputs = dry_run(two_benchmarks, target, "--configfile", "config/two.yaml")
    datasets = ["digits_012", *OOD]
    # Every set's data and test dump, the seed-1 model and its train dump (knn fits).
    # No audit: tiny drops no OOD set, so the dumps read the curated sets directly.
    assert counts == {
        "curate_dataset": len(datasets),
        "train": 1,
        "features": 1 + len(datasets),
        "score": 1,
    }
    assert outputs == {
        *(f"resources/data/{d}/manifest.csv" for d in datasets),
        "results/models/tiny/ce/seed1/model.pt",
        "results/models/tiny/ce/seed1/train_log.csv",
        "results/features/tiny/ce/seed1/train/digits_012.parquet",
        *(f"results/features/tiny/ce/seed1/test/{d}.parquet" for d in datasets),
        target,
    }


def test_one_model_plans_its_training_only(two_benchmarks):
    target = "results/models/tiny/ce/seed1/model.pt"
    counts, outputs = dry_run(two_benchmarks, target, "--configfile", "config/two.yaml")
    assert counts == {"curate_dataset": 1, "train": 1}
    assert "results/models/tiny/ce/seed0/model.pt" not in outputs


def test_one_benchmarks_table_plans_that_benchmark_only(two_benchmarks):
    counts, outputs = dry_run(
        two_benchmarks, "results/tables/small.csv", "--configfile", "config/two.yaml"
    )
    # small: one model, ID + noise; one job each for msp and knn.
    assert counts == {
        "curate_dataset": 2,
        "audit": 1,
        "train": 1,
        "features": 3,
        "score": 2,
        "benchmark_table": 1,
    }
    assert not [p for p in outputs if "/tiny/" in p], "planned work of benchmark tiny"
    assert {"results/tables/small.csv", "results/tables/small.md"} <= outputs


def test_all_csv_joins_every_benchmarks_table(two_benchmarks):
    counts, _ = dry_run(two_benchmarks, "results/tables/all.csv", "--configfile", "config/two.yaml")
    # tiny: 2 seeds x (2 + 3 dumps); small: 1 seed x 3 dumps (train, ID test, noise).
    assert counts["train"] == 3 and counts["features"] == 2 * 5 + 3
    assert counts["benchmark_table"] == 2 and counts["tables"] == 1


def test_forcerun_of_one_training_job_replans_its_downstream_only(run):
    """Data curation and the audit stay; the model, its dumps, scores and tables rerun."""
    workdir, _ = run
    model = "results/models/tiny/ce/seed0/model.pt"
    counts, _ = dry_run(
        workdir,
        "results/tables/all.csv",
        "--forcerun",
        model,
        "--configfile",
        "config/tiny.yaml",
    )
    assert counts == {
        "train": 1,
        "features": 2 + len(OOD),  # train + test split of the ID set, and each OOD set
        "score": len(VARIANTS),
        "benchmark_table": 1,
        "tables": 1,
    }


def test_forcerun_of_one_score_replans_that_score_and_the_tables(run):
    workdir, _ = run
    target = "results/scores/tiny/ce/seed0/energy"
    counts, outputs = dry_run(
        workdir, "results/tables/all.csv", "--forcerun", target, "--configfile", "config/tiny.yaml"
    )
    assert counts == {"score": 1, "benchmark_table": 1, "tables": 1}
    assert target in outputs
