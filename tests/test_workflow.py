"""The whole DAG on a tiny config in a temp directory, checked file by file."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ood.data.manifest import read_manifest
from ood.io import read_features, read_scores, sha256_file
from ood.metrics import accuracy, ood_metrics
from ood.scores import SCORERS
from ood.scores.variants import expand_all
from ood.tables import COLUMNS

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Variant ids of tiny.yaml's scorers (knn is a grid over k).
VARIANTS = {
    "msp": "msp",
    "maxlogit": "maxlogit",
    "energy": "energy",
    "mahalanobis": "mahalanobis",
    "knn-k3": "knn",
    "knn-k5": "knn",
    "react": "react",
    "csd": "csd",
    "odin": "odin",
}
OOD = {"digits_34": "near", "textures": "far", "noise": "far"}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> count from the 'Job stats' table of a dry run."""
    counts = {}
    for rule, count in re.findall(r"^(\w+)\s+(\d+)$", output, flags=re.M):
        if rule != "total":
            counts[rule] = int(count)
    return counts


def copy_workflow(workdir: Path) -> Path:
    """What a fresh checkout has, without results: the workflow runs from here."""
    for name in ("Snakefile", "workflow", "config", "envs", "profiles"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / name)
    shutil.copy(REPO / "tests/fixtures/tiny.yaml", workdir / "config/tiny.yaml")
    return workdir


def test_all_csv_has_one_row_per_scorer_and_ood_set(run):
    workdir, _ = run
    table = pd.read_csv(workdir / "results/tables/all.csv")
    assert list(table.columns) == COLUMNS
    assert len(table) == len(VARIANTS) * len(OOD)
    assert dict(zip(table.variant, table.scorer, strict=True)) == VARIANTS
    knn = table[table.scorer == "knn"]
    assert set(knn.scorer_params) == {'{"k": 3}', '{"k": 5}'}
    assert dict(zip(table.ood_dataset, table.ood_group, strict=True)) == OOD
    assert set(table.benchmark) == {"tiny"} and set(table.id_dataset) == {"digits_012"}
    assert set(table.method) == {"ce"} and set(table.backbone) == {"resnet18_32_pool"}
    # digits 0-2, 16 each, half to test; OOD: 2 x 6 digits, 2 x 5 crops, 10 noise
    assert set(table.n_id) == {24}
    assert dict(zip(table.ood_dataset, table.n_ood, strict=True)) == {
        "digits_34": 12,
        "textures": 10,
        "noise": 10,
    }
    for column in ("auroc", "fpr95", "aupr_in", "aupr_out", "id_acc"):
        assert table[column].between(0, 1).all(), column


def test_metrics_recomputed_from_the_dumps(run):
    workdir, _ = run
    table = pd.read_csv(workdir / "results/tables/all.csv")
    scores = workdir / "results/scores/tiny/ce/seed0"
    id_test = read_features(workdir / "results/features/tiny/ce/seed0/test/digits_012.parquet")
    for row in table.itertuples():
        id_scores = read_scores(scores / row.variant / "digits_012.parquet").score
        ood_scores = read_scores(scores / row.variant / f"{row.ood_dataset}.parquet").score
        expected = ood_metrics(id_scores, ood_scores)
        for metric, value in expected.items():
            assert getattr(row, metric) == pytest.approx(value, abs=1e-6), (row, metric)
        assert row.id_acc == pytest.approx(accuracy(id_test.logits, id_test.label), abs=1e-6)


def test_scores_follow_the_sign_convention(run):
    """energy = T * logsumexp(logits / T) with T = 2 from the config, from the dump itself."""
    workdir, _ = run
    dump = read_features(workdir / "results/features/tiny/ce/seed0/test/noise.parquet")
    scores = read_scores(workdir / "results/scores/tiny/ce/seed0/energy/noise.parquet")
    logits = dump.logits.astype(np.float64) / 2.0
    peak = logits.max(axis=1, keepdims=True)
    expected = 2.0 * (peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1)))
    np.testing.assert_allclose(scores.score, expected, rtol=1e-6)
    assert (scores.label == -1).all() and (dump.label == -1).all()


def test_provenance_chain(run):
    workdir, _ = run
    for dataset in ("digits_012", *OOD):
        data_dir = workdir / "resources/data" / dataset
        for row in read_manifest(data_dir):
            digest = hashlib.sha256((data_dir / row.path).read_bytes()).hexdigest()
            assert digest == row.sha256
    dump = read_features(workdir / "results/features/tiny/ce/seed0/test/textures.parquet")
    assert dump.metadata["checkpoint_sha256"] == sha256_file(
        workdir / "results/models/tiny/ce/seed0/model.pt"
    )
    assert dump.metadata["manifest_sha256"] == sha256_file(
        workdir / "resources/data/textures/manifest.csv"
    )
    assert len(dump) == len(read_manifest(workdir / "resources/data/textures"))
    table = pd.read_csv(workdir / "results/tables/all.csv")
    manifest = {
        name: sha256_file(workdir / "resources/data" / name / "manifest.csv")
        for name in ("digits_012", *OOD)
    }
    assert set(table.id_manifest_sha256) == {manifest["digits_012"]}
    for row in table.itertuples():
        assert row.ood_manifest_sha256 == manifest[row.ood_dataset]


def test_training_log_and_rule_logs(run):
    workdir, _ = run
    log = pd.read_csv(workdir / "results/models/tiny/ce/seed0/train_log.csv")
    assert list(log.columns) == ["epoch", "loss", "accuracy", "lr", "seconds"]
    assert list(log.epoch) == [1, 2]
    assert (workdir / "results/logs/train/tiny/ce/seed0.log").read_text().count("epoch") >= 2
    assert (workdir / "results/benchmarks/train/tiny/ce/seed0.tsv").exists()
    summary = (workdir / "results/tables/tiny.md").read_text()
    assert summary.count("| ce | resnet18_32_pool |") == len(VARIANTS)
    assert summary.index("digits_34 AUROC") < summary.index("textures AUROC")


def test_second_run_does_nothing(run):
    workdir, _ = run
    result = snakemake(workdir, "results/tables/all.csv", "-n", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_grid_variants_share_the_dumps(run):
    """Both knn variants read the same train and test dumps; only k differs."""
    workdir, _ = run
    base = workdir / "results/scores/tiny/ce/seed0"
    k3, k5 = (read_scores(base / v / "noise.parquet").metadata for v in ("knn-k3", "knn-k5"))
    assert k3["test_sha256"] == k5["test_sha256"] and k3["train_sha256"] == k5["train_sha256"]
    assert (k3["params"], k5["params"]) == ('{"k": 3}', '{"k": 5}')
    assert not np.array_equal(
        read_scores(base / "knn-k3/noise.parquet").score,
        read_scores(base / "knn-k5/noise.parquet").score,
    )


def test_views_written_because_csd_is_configured(run):
    workdir, _ = run
    dump = read_features(
        workdir / "results/features/tiny/ce/seed0/test/noise.parquet", extra=("views",)
    )
    assert dump.extra["views"].shape == (len(dump), 6 * dump.feature.shape[1])
    assert dump.metadata["views"] == "6"
    # The 5th view is the global average pool, i.e. the penultimate feature itself.
    width = dump.feature.shape[1]
    np.testing.assert_allclose(
        dump.extra["views"][:, 4 * width : 5 * width], dump.feature, atol=1e-5
    )


@pytest.mark.parametrize(
    ("scorer", "change", "replanned"),
    [
        ("energy", {"temperature": 3.0}, "energy"),  # a parameter: that scorer only
        ("knn", {"k": [3, 4]}, "knn-k4"),  # a grid value: that variant only (knn-k3 stays)
    ],
)
def test_changing_a_scorer_parameter_reruns_only_that_scorer(run, scorer, change, replanned):
    workdir, _ = run
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    config["benchmarks"]["tiny"]["scorers"][scorer].update(change)
    (workdir / "config/changed.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(
        workdir, "results/tables/all.csv", "-n", "--configfile", "config/changed.yaml"
    )
    # One score job (all of the benchmark's sets), then the tables.
    assert planned_jobs(result.stdout) == {"score": 1, "benchmark_table": 1, "tables": 1}
    outputs = set(re.findall(r"^\s+output: (results/scores/\S+)$", result.stdout, flags=re.M))
    assert outputs == {f"results/scores/tiny/ce/seed0/{replanned}"}


def test_lint_is_clean(run):
    workdir, _ = run
    result = snakemake(workdir, "--lint", "--configfile", "config/tiny.yaml")
    assert "Congratulations, your workflow is in a good condition!" in result.stderr


def test_demo_meets_its_targets(tmp_path):
    """The embedded demo, exactly as `make demo` runs it: every method trains and is
    scored with its paper's scorers (ce with every scorer); ce reaches ID accuracy
    >= 0.9 and knn separates Gaussian noise with AUROC >= 0.95 (the acceptance bar)."""
    from ood.train import METHODS, objective_class

    workdir = copy_workflow(tmp_path)
    snakemake(workdir, "results/tables/all.csv", "--configfile", "config/config.yaml")
    table = pd.read_csv(workdir / "results/tables/all.csv")
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    bench = config["benchmarks"]["demo"]
    variants = expand_all(bench["scorers"])
    assert set(table.method) == set(METHODS) == set(bench["methods"])
    ce = table[table.method == "ce"]
    # ce: a row for every scorer but mos (it needs a group-softmax model).
    assert set(ce.scorer) == set(SCORERS) - {"mos"}
    assert len(ce) == (len(variants) - 1) * 4  # every variant x four OOD sets
    for method in METHODS:
        rows = table[table.method == method]
        paper = set(objective_class(method).scorers)
        if method != "ce":
            assert set(rows.scorer) == paper == set(bench["methods"][method]["scorers"]), method
        assert len(rows) % 4 == 0 and rows.auroc.notna().all(), method
    assert ce.id_acc.min() >= 0.9
    # oe and oaml trained on the outliers the tiny Stable Diffusion pipeline synthesised.
    dream = bench["synthesis"]["dream"]
    synthesised = read_manifest(workdir / "results/outliers/demo/dream/set")
    assert len(synthesised) == 6 * dream["embed"]["keep"]  # digits 0-5
    assert bench["methods"]["oe"]["outliers"] == bench["methods"]["oaml"]["outliers"] == "dream"
    knn_noise = ce[(ce.variant == "knn-k50") & (ce.ood_dataset == "noise")]
    assert knn_noise.auroc.item() >= 0.95


def needs_train_dump(bench: dict, method: str) -> bool:
    from ood.config import scorer_skip_reason
    from ood.scores import scorer_class

    return any(
        scorer_class(name).fits and not scorer_skip_reason(bench, method, name)
        for name, _ in expand_all(bench["scorers"]).values()
    )


@pytest.mark.parametrize(
    "name", ["cifar10", "cifar100", "cifar10_lt", "cifar100_lt", "imagenet", "imagenet_lt"]
)
def test_real_benchmark_configs_plan(tmp_path, name):
    """`snakemake -n --configfile config/<name>.yaml` plans every stage; counts from the config."""
    from ood.config import scorer_skip_reason, user_files, validate_config

    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    validate_config(config, str(REPO / "workflow/schemas/config.schema.yaml"))  # defaults
    (bench,) = config["benchmarks"].values()
    # Weights and group files a user provides: stand-ins, so that the plan is complete.
    for path in user_files(bench):
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).touch()
    result = snakemake(
        workdir, "results/tables/all.csv", "-n", "-p", "--configfile", f"config/{name}.yaml"
    )
    # ImageNet's images differ in size: its models, class embeddings and synthesised
    # sets are streamed; the CIFAR benchmarks decode their 32x32 images once.
    output = result.stdout + result.stderr
    streamed = name.startswith("imagenet")
    assert bench["train"].get("images", "memory") == ("stream" if streamed else "memory")
    trains = re.findall(r"ood train .*", output)
    assert trains and all(('"images":"stream"' in c) == streamed for c in trains)
    for command in re.findall(r"ood synth-(?:embed|collect) .*", output):
        assert ('"images":"stream"' in command or "--keep-size" in command) == streamed
    ood = [d for group in bench["ood"].values() for d in group]
    synthesis = bench.get("synthesis", {})
    outliers = {spec["outliers"] for spec in bench["methods"].values() if "outliers" in spec}
    used = [bench["id_dataset"], *ood, *sorted(outliers - set(synthesis))]
    downloads = {d for ds in used for d in config["datasets"][ds].get("inputs", {}).values()}
    methods, seeds = bench["methods"], len(bench["seeds"])
    variants = expand_all(bench["scorers"]).values()
    scored = sum(not scorer_skip_reason(bench, m, name) for m in methods for name, _ in variants)
    dumps = sum(1 + len(ood) + needs_train_dump(bench, m) for m in methods)
    synthesis_jobs = {
        "synth_embed": len(synthesis),
        "synth_generate": sum(spec["shards"] for spec in synthesis.values()),
        "synth_collect": len(synthesis),
    }
    assert planned_jobs(result.stdout) == {
        **{rule: count for rule, count in synthesis_jobs.items() if count},
        "fetch": len(downloads),
        "curate_dataset": len(used),
        "audit": len(ood),
        "train": seeds * len(methods),
        "features": seeds * dumps,
        "score": seeds * scored,  # one job scores every set
        "benchmark_table": 1,
        "tables": 1,
    }


def test_gradient_scorer_reads_only_the_images_it_needs(run):
    """odin needs the model and the scored sets' images, not the train images or dump;
    one job scores every set of the benchmark, each into its own file."""
    workdir, _ = run
    target = "results/scores/tiny/ce/seed0/odin"
    result = snakemake(
        workdir, target, "-n", "-p", "--forcerun", target, "--configfile", "config/tiny.yaml"
    )
    (command,) = re.findall(r"ood score .*", result.stdout + result.stderr)
    datasets = ("digits_012", *sorted(OOD))  # ID, then OOD sets by name
    assert "--checkpoint results/models/tiny/ce/seed0/model.pt" in command
    manifests = " ".join(f"resources/data/{d}/manifest.csv" for d in datasets)
    assert f"--test-manifest {manifests} " in command
    dumps = " ".join(f"results/features/tiny/ce/seed0/test/{d}.parquet" for d in datasets)
    outs = " ".join(f"{target}/{d}.parquet" for d in datasets)
    assert f"--test {dumps} --out {outs} " in command
    assert "--train-manifest" not in command and "--train " not in command


def test_outlier_method_trains_on_its_outlier_set(tmp_path):
    """oe's train job reads the configured outlier set (curated like any dataset); ce's not."""
    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    config["datasets"]["aux"] = {"source": "gaussian_noise", "params": {"n": 8, "seed": 9}}
    config["benchmarks"]["tiny"]["methods"]["oe"] = {"outliers": "aux"}
    (workdir / "config/oe.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(
        workdir,
        "results/models/tiny/oe/seed0/model.pt",
        "results/models/tiny/ce/seed0/model.pt",
        "-n",
        "-p",
        "--configfile",
        "config/oe.yaml",
    )
    assert planned_jobs(result.stdout) == {"curate_dataset": 2, "train": 2}
    commands = re.findall(r"ood train .*", result.stdout + result.stderr)
    (oe,) = [c for c in commands if "--method oe" in c]
    (ce,) = [c for c in commands if "--method ce" in c]
    assert "--outliers resources/data/aux/manifest.csv" in oe
    assert "--outliers" not in ce


def test_synthesis_feeds_outlier_training(tmp_path):
    """A synthesised set (tiny pipeline, two shard jobs) is the outlier set oe trains on;
    a sampler change regenerates the shards and retrains, but keeps the class embeddings."""
    import torch

    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    bench = config["benchmarks"]["tiny"]
    bench["synthesis"] = {
        "dream": {
            "pipeline": "tiny",
            "shards": 2,
            "embed": {"epochs": 1, "batch_size": 8, "k": 2, "keep": 3, "pool": 10},
            "sample": {"steps": 2, "resolution": 32, "batch_size": 2},
        }
    }
    bench["methods"]["oe"] = {"outliers": "dream", "train": {"epochs": 1}}
    (workdir / "config/synth.yaml").write_text(yaml.safe_dump(config))
    target = "results/models/tiny/oe/seed0/model.pt"
    args = ("--configfile", "config/synth.yaml")
    result = snakemake(workdir, target, "-p", *args)
    output = result.stdout + result.stderr
    assert planned_jobs(output) == {
        "curate_dataset": 1,
        "tiny_pipeline": 1,
        "synth_embed": 1,
        "synth_generate": 2,
        "synth_collect": 1,
        "train": 1,
    }
    root = workdir / "results/outliers/tiny/dream"
    assert "--outliers results/outliers/tiny/dream/set/manifest.csv" in output
    assert [p.name for p in sorted((root / "shards").iterdir())] == ["1of2.csv", "2of2.csv"]
    assert len(read_manifest(root / "set")) == 9  # 3 classes x keep 3
    assert len(list((root / "contact").glob("class*.png"))) == 3
    assert Image.open(root / "overview.png").size == (3 * 32, 3 * 32)  # 3 classes x 3 samples
    # The overview is an item of the Snakemake report, in its own category.
    snakemake(workdir, target, "--report", "report.html", *args)
    report = (workdir / "report.html").read_text()
    assert "Outlier synthesis" in report and "overview.png" in report
    meta = torch.load(workdir / target, weights_only=False)["meta"]
    assert meta["n_outliers"] == 9
    assert meta["outliers_manifest_sha256"] == sha256_file(root / "set/manifest.csv")
    assert "Nothing to be done" in snakemake(workdir, target, "-n", *args).stdout
    bench["synthesis"]["dream"]["sample"]["steps"] = 3
    (workdir / "config/synth.yaml").write_text(yaml.safe_dump(config))
    replanned = planned_jobs(snakemake(workdir, target, "-n", *args).stdout)
    assert replanned == {"synth_generate": 2, "synth_collect": 1, "train": 1}
