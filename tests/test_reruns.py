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


@pytest.fixture(scope="module")
def dependent_methods(tmp_path_factory):
    """tiny plus mode_f fine-tuning ce, and oaml distilling from ce on an outlier set;
    each scored with its own list of scorers."""
    workdir = copy_workflow(tmp_path_factory.mktemp("dependent"))
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    config["datasets"]["aux"] = {"source": "gaussian_noise", "params": {"n": 8, "seed": 9}}
    config["benchmarks"]["tiny"]["methods"].update(
        mode_f={"init": "ce", "scorers": ["knn"]},
        oaml={"outliers": "aux", "teacher": "ce", "scorers": ["energy", "msp"]},
    )
    (workdir / "config/dependent.yaml").write_text(yaml.safe_dump(config))
    return workdir


def test_init_and_teacher_are_inputs_of_the_train_job(dependent_methods):
    """mode_f starts from ce's model and oaml learns from it: both wait for ce's
    training job and get its checkpoint on the command line."""
    result = snakemake(
        dependent_methods,
        "results/models/tiny/mode_f/seed0/model.pt",
        "results/models/tiny/oaml/seed0/model.pt",
        "-n",
        "-p",
        "--configfile",
        "config/dependent.yaml",
    )
    commands = re.findall(r"ood train .*", result.stdout + result.stderr)
    by_method = {re.search(r"--method (\S+)", c).group(1): c for c in commands}
    assert set(by_method) == {"ce", "mode_f", "oaml"}
    ce_model = "results/models/tiny/ce/seed0/model.pt"
    assert f'"pretrained":"{ce_model}"' in by_method["mode_f"]
    assert f"--teacher {ce_model}" in by_method["oaml"]
    assert "--outliers resources/data/aux/manifest.csv" in by_method["oaml"]
    assert "--teacher" not in by_method["mode_f"] and "pretrained" not in by_method["ce"]


def test_a_methods_scorers_list_limits_its_score_jobs(dependent_methods):
    counts, outputs = dry_run(
        dependent_methods, "results/tables/all.csv", "--configfile", "config/dependent.yaml"
    )
    scores = {
        p.split("/seed0/")[0].split("/")[-1] + "/" + p.split("/")[-1]
        for p in outputs
        if p.startswith("results/scores/")
    }
    assert {s for s in scores if s.startswith("mode_f/")} == {"mode_f/knn-k3", "mode_f/knn-k5"}
    assert {s for s in scores if s.startswith("oaml/")} == {"oaml/energy", "oaml/msp"}
    assert counts["score"] == len(VARIANTS) + 2 + 2
    # oaml's scorers fit nothing: no train-split dump is planned for it.
    assert not any(p.startswith("results/features/tiny/oaml/seed0/train/") for p in outputs)


def test_all_csv_is_never_tried_as_a_benchmark_table(two_benchmarks):
    """results/tables/all.csv matches benchmark_table's pattern too; the wildcard
    constraint keeps Snakemake from evaluating it with benchmark=all (which used to
    print a KeyError while building the DAG)."""
    result = snakemake(
        two_benchmarks, "results/tables/all.csv", "-n", "--configfile", "config/two.yaml"
    )
    assert "InputFunctionException" not in result.stdout + result.stderr
    assert planned_jobs(result.stdout)["tables"] == 1
