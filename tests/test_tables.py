"""Results tables from hand-made dumps: all.csv rows, metrics, the markdown summary."""

import hashlib
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ood import metrics
from ood.io import FeatureSet, ScoreSet, write_features, write_scores
from ood.tables import COLUMNS, build_long_table, wide_markdown, write_tables

BENCH, ID_SET, METHOD, BACKBONE = "bench", "cifar10", "ce", "resnet18_32"
NEAR, FAR = ["cifar100"], ["svhn", "places"]
# Far listed before near on purpose: the markdown must still put near first.
BENCHMARKS = {BENCH: {"id_dataset": ID_SET, "ood": {"far": FAR, "near": NEAR}}}
SEEDS = (0, 1)
SCORERS = {"msp": {}, "energy": {"temperature": 1.0}}
GROUP = {"cifar100": "near", "svhn": "far", "places": "far"}
# Sizes with factors 3, 7, 11, 13 keep averages off exact 2-decimal rounding ties.
N_OOD = {"cifar100": 3, "svhn": 11, "places": 13}

# Hand-made scores for seed 0 / msp: ID vs cifar100.
HAND_ID = [0.9, 0.8, 0.7, 0.6]
HAND_NEAR = [0.75, 0.5, 0.7]

# ID test labels and logits per seed; argmax accuracy worked by hand.
ID_LABELS = [0, 1, 2, 1]
ID_LOGITS = {
    0: [[3, 0, 0], [0, 2, 1], [0, 0, 1], [5, 1, 0]],  # predicts 0, 1, 2, 0: 3 of 4 right
    1: [[3, 0, 0], [2, 1, 0], [0, 0, 1], [0, 0, 4]],  # predicts 0, 0, 2, 2: 2 of 4 right
}
ID_ACC = {0: 0.75, 1: 0.5}


def score_meta(seed, scorer, dataset, benchmark=BENCH) -> dict:
    """Metadata as ood.scores.run.score_dump writes it (feature keys prefixed)."""
    return {
        "scorer": scorer,
        "params": json.dumps(SCORERS.get(scorer, {}), sort_keys=True),
        "ood_version": "0.1.0",
        "test_path": f"features/{dataset}.parquet",
        "test_sha256": "0" * 64,
        "features.benchmark": benchmark,
        "features.method": METHOD,
        "features.backbone": BACKBONE,
        "features.seed": str(seed),
        "features.dataset": dataset,
        "features.split": "test",
        "features.manifest_sha256": manifest_digest(dataset),
    }


def manifest_digest(dataset: str) -> str:
    return hashlib.sha256(dataset.encode()).hexdigest()


def write_score_file(root: Path, seed, scorer, dataset, values, changes=None) -> str:
    """Write one score dump; `changes` overrides metadata keys (None drops a key)."""
    path = root / "scores" / BENCH / METHOD / f"seed{seed}" / scorer / f"{dataset}.parquet"
    values = np.asarray(values, dtype=np.float64)
    meta = {**score_meta(seed, scorer, dataset), **(changes or {})}
    meta = {k: v for k, v in meta.items() if v is not None}
    label = np.zeros(len(values), np.int64) if dataset == ID_SET else -np.ones(len(values), int)
    write_scores(path, ScoreSet(np.arange(len(values)), label, values, meta))
    return str(path)


def write_id_features(root: Path, seed) -> str:
    path = root / "features" / BENCH / METHOD / f"seed{seed}" / "test" / f"{ID_SET}.parquet"
    write_features(
        path,
        FeatureSet(
            index=np.arange(4),
            label=np.array(ID_LABELS),
            logits=np.array(ID_LOGITS[seed], dtype=np.float32),
            feature=np.ones((4, 2), np.float32),
            metadata={
                "benchmark": BENCH,
                "method": METHOD,
                "backbone": BACKBONE,
                "seed": str(seed),
                "dataset": ID_SET,
                "split": "test",
            },
        ),
    )
    return str(path)


@pytest.fixture
def dumps(tmp_path):
    """Writes 2 seeds x 2 scorers x (ID + 3 OOD) score dumps and 2 ID feature dumps.

    Returns the paths and the score arrays keyed by (seed, scorer, dataset).
    """
    rng = np.random.default_rng(7)
    arrays, files, id_files = {}, [], {}
    for seed in SEEDS:
        for scorer in SCORERS:
            hand = (seed, scorer) == (0, "msp")
            id_values = HAND_ID if hand else rng.normal(1.0, 1.0, size=7)
            arrays[(seed, scorer, ID_SET)] = np.asarray(id_values, dtype=np.float64)
            id_files[(seed, scorer)] = write_score_file(tmp_path, seed, scorer, ID_SET, id_values)
            files.append(id_files[(seed, scorer)])
            for dataset, n in N_OOD.items():
                values = HAND_NEAR if hand and dataset == "cifar100" else rng.normal(size=n)
                arrays[(seed, scorer, dataset)] = np.asarray(values, dtype=np.float64)
                files.append(write_score_file(tmp_path, seed, scorer, dataset, values))
    features = [write_id_features(tmp_path, seed) for seed in SEEDS]
    return {
        "root": tmp_path,
        "scores": files,
        "id_scores": id_files,
        "features": features,
        "arrays": arrays,
    }


# -- independent metric implementations -------------------------------------------


def pair_auroc(id_s, ood_s) -> float:
    """P(score_id > score_ood), ties counted 1/2, by counting every pair."""
    wins = sum(1.0 if i > o else 0.5 if i == o else 0.0 for i in id_s for o in ood_s)
    return wins / (len(id_s) * len(ood_s))


def threshold_fpr95(id_s, ood_s) -> float:
    """Smallest fraction of OOD with score >= t over thresholds t accepting >= 95% of ID."""
    id_s, ood_s = np.asarray(id_s), np.asarray(ood_s)
    candidates = [
        np.mean(ood_s >= t) for t in np.concatenate([id_s, ood_s]) if np.mean(id_s >= t) >= 0.95
    ]
    return float(min(candidates))


def step_average_precision(pos, neg) -> float:
    """Sum over distinct thresholds (descending) of recall increase x precision."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(pos) | set(neg), reverse=True):
        tp, fp = np.sum(pos >= t), np.sum(neg >= t)
        recall = tp / len(pos)
        total += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return float(total)


def expected_metrics(id_s, ood_s) -> dict:
    id_s, ood_s = np.asarray(id_s), np.asarray(ood_s)
    return {
        "auroc": pair_auroc(id_s, ood_s),
        "fpr95": threshold_fpr95(id_s, ood_s),
        "aupr_in": step_average_precision(id_s, ood_s),
        "aupr_out": step_average_precision(-ood_s, -id_s),
    }


def expected_key_order():
    """Rows sorted by seed, scorer, ood_group, ood_dataset."""
    return [
        (seed, scorer, GROUP[ds], ds)
        for seed in SEEDS
        for scorer in sorted(SCORERS)
        for ds in sorted(GROUP, key=lambda d: (GROUP[d], d))
    ]


# -- build_long_table -------------------------------------------------------------


def test_long_table_rows(dumps):
    table = build_long_table(dumps["scores"], dumps["features"], BENCHMARKS)
    assert list(table.columns) == COLUMNS
    assert len(table) == len(SEEDS) * len(SCORERS) * 3 == 12
    keys = list(zip(table.seed, table.scorer, table.ood_group, table.ood_dataset, strict=True))
    assert keys == expected_key_order()
    assert set(table.benchmark) == {BENCH} and set(table.id_dataset) == {ID_SET}
    assert set(table.method) == {METHOD} and set(table.backbone) == {BACKBONE}

    arrays = dumps["arrays"]
    for row in table.itertuples():
        id_s = arrays[(row.seed, row.scorer, ID_SET)]
        ood_s = arrays[(row.seed, row.scorer, row.ood_dataset)]
        assert row.n_id == len(id_s) and row.n_ood == len(ood_s) == N_OOD[row.ood_dataset]
        assert row.id_acc == ID_ACC[row.seed]
        assert json.loads(row.scorer_params) == SCORERS[row.scorer]
        # Against independent implementations ...
        for name, value in expected_metrics(id_s, ood_s).items():
            assert getattr(row, name) == pytest.approx(value, abs=1e-12), (row, name)
        # ... and against the package's own metric functions on the in-memory arrays.
        assert row.auroc == metrics.auroc(id_s, ood_s)
        assert row.fpr95 == metrics.fpr_at_95_tpr(id_s, ood_s)
        assert row.aupr_in == metrics.aupr_in(id_s, ood_s)
        assert row.aupr_out == metrics.aupr_out(id_s, ood_s)


def test_long_table_hand_row(dumps):
    table = build_long_table(dumps["scores"], dumps["features"], BENCHMARKS)
    row = table[(table.seed == 0) & (table.scorer == "msp") & (table.ood_dataset == "cifar100")]
    assert len(row) == 1
    row = row.iloc[0]
    assert (row.ood_group, row.n_id, row.n_ood) == ("near", 4, 3)
    # ID [0.9, 0.8, 0.7, 0.6] vs OOD [0.75, 0.5, 0.7]: 12 pairs.
    #   OOD 0.75: beaten by 0.9, 0.8                      -> 2
    #   OOD 0.5 : beaten by all four                      -> 4
    #   OOD 0.7 : beaten by 0.9, 0.8; tie with 0.7 (1/2)  -> 2.5
    # AUROC = (2 + 4 + 2.5) / 12 = 8.5 / 12
    assert row.auroc == pytest.approx(8.5 / 12, abs=1e-15)
    # 95% of 4 ID samples needs all 4: threshold 0.6; OOD >= 0.6 are 0.75 and 0.7.
    assert row.fpr95 == pytest.approx(2 / 3, abs=1e-15)
    assert row.id_acc == 0.75


def test_long_table_ignores_order_of_inputs(dumps):
    forward = build_long_table(dumps["scores"], dumps["features"], BENCHMARKS)
    backward = build_long_table(dumps["scores"][::-1], dumps["features"][::-1], BENCHMARKS)
    pd.testing.assert_frame_equal(forward, backward)


# -- write_tables -----------------------------------------------------------------


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def pct_cell(aurocs, fprs) -> str:
    """Mean ± population std over seeds, in %, for AUROC and FPR95."""
    parts = []
    for values in (aurocs, fprs):
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        parts.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
    return " / ".join(parts)


def test_write_tables_csv_and_markdown(dumps):
    out = dumps["root"] / "tables"
    returned = write_tables(dumps["scores"], dumps["features"], BENCHMARKS, out / "all.csv", out)
    assert sorted(p.name for p in out.iterdir()) == ["all.csv", f"{BENCH}.md"]

    csv = pd.read_csv(out / "all.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == 12
    keys = list(zip(csv.seed, csv.scorer, csv.ood_group, csv.ood_dataset, strict=True))
    assert keys == expected_key_order()
    assert csv.seed.dtype == np.int64 and csv.n_id.dtype == np.int64
    arrays = dumps["arrays"]
    for row in csv.itertuples():
        id_s = arrays[(row.seed, row.scorer, ID_SET)]
        ood_s = arrays[(row.seed, row.scorer, row.ood_dataset)]
        assert (row.n_id, row.n_ood) == (len(id_s), len(ood_s))
        assert row.id_acc == ID_ACC[row.seed]
        for name, value in expected_metrics(id_s, ood_s).items():
            assert getattr(row, name) == pytest.approx(value, abs=5e-7)  # %.6f in the CSV
    np.testing.assert_allclose(csv[["auroc", "fpr95"]], returned[["auroc", "fpr95"]], atol=5e-7)

    lines = (out / f"{BENCH}.md").read_text().splitlines()
    assert lines[0] == f"# {BENCH}: ID {ID_SET}"
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = cells(lines[header_at])
    assert header == [
        "method",
        "backbone",
        "scorer",
        "seeds",
        "ID acc",
        "cifar100 AUROC / FPR95",  # near datasets first
        "svhn AUROC / FPR95",
        "places AUROC / FPR95",
        "near avg AUROC / FPR95",
        "far avg AUROC / FPR95",
    ]
    body = [cells(line) for line in lines[header_at + 2 :] if line.startswith("|")]
    assert [row[:4] for row in body] == [
        [METHOD, BACKBONE, "energy", "2"],
        [METHOD, BACKBONE, "msp", "2"],
    ]
    for row in body:
        scorer = row[2]
        per = {
            (seed, ds): expected_metrics(arrays[(seed, scorer, ID_SET)], arrays[(seed, scorer, ds)])
            for seed in SEEDS
            for ds in GROUP
        }
        # (0.75 + 0.5) / 2 = 62.5%, population std 12.5%.
        assert row[4] == "62.50 ± 12.50"
        for ds in ("cifar100", "svhn", "places"):
            assert row[header.index(f"{ds} AUROC / FPR95")] == pct_cell(
                [per[(s, ds)]["auroc"] for s in SEEDS], [per[(s, ds)]["fpr95"] for s in SEEDS]
            )
        for group, datasets in (("near", NEAR), ("far", FAR)):
            # Per seed: mean over the group's datasets; then mean ± std over seeds.
            aurocs = [statistics.fmean(per[(s, d)]["auroc"] for d in datasets) for s in SEEDS]
            fprs = [statistics.fmean(per[(s, d)]["fpr95"] for d in datasets) for s in SEEDS]
            assert row[header.index(f"{group} avg AUROC / FPR95")] == pct_cell(aurocs, fprs)


def test_markdown_single_seed_has_no_spread(dumps):
    out = dumps["root"] / "tables"
    scores = [f for f in dumps["scores"] if "/seed0/" in f]
    write_tables(scores, dumps["features"][:1], BENCHMARKS, out / "all.csv", out)
    lines = (out / f"{BENCH}.md").read_text().splitlines()
    msp = next(
        cells(line) for line in lines if line.startswith(f"| {METHOD} |") and "| msp |" in line
    )
    assert msp[3] == "1" and msp[4] == "75.00"
    # cifar100 for seed 0 / msp is the hand case: AUROC 8.5/12, FPR95 2/3.
    assert msp[5] == "70.83 / 66.67"
    assert "±" not in "".join(msp)
    assert len(pd.read_csv(out / "all.csv")) == 6


def test_grid_variants_sort_by_their_numbers_not_as_text(tmp_path):
    variants = ("knn-k50", "knn-k5", "knn-k10", "react-p90")
    files = [
        write_score_file(tmp_path, 0, v, d, values, {"scorer": v.split("-")[0], "variant": v})
        for v in variants
        for d, values in ((ID_SET, HAND_ID), ("svhn", [0.1, 0.2]))
    ]
    table = build_long_table(files, [write_id_features(tmp_path, 0)], BENCHMARKS)
    natural = ["knn-k5", "knn-k10", "knn-k50", "react-p90"]
    assert table["variant"].tolist() == natural
    markdown = wide_markdown(table, BENCH, BENCHMARKS).splitlines()
    assert [cells(line)[2] for line in markdown if line.startswith(f"| {METHOD} |")] == natural


# -- errors -----------------------------------------------------------------------


def assert_nothing_written(out: Path):
    assert not (out / "all.csv").exists()
    assert not out.exists() or list(out.iterdir()) == []


def test_error_benchmark_not_in_config(dumps):
    bad = write_score_file(
        dumps["root"] / "other", 0, "msp", "svhn", [0.1, 0.2], {"features.benchmark": "zoo"}
    )
    out = dumps["root"] / "tables"
    with pytest.raises(ValueError, match=re.escape(f"{bad}: benchmark 'zoo' is not in the config")):
        write_tables([*dumps["scores"], bad], dumps["features"], BENCHMARKS, out / "all.csv", out)
    assert_nothing_written(out)


def test_error_ood_without_id_scores(dumps):
    id_file = dumps["id_scores"][(1, "energy")]
    scores = [f for f in dumps["scores"] if f != id_file]
    first_orphan = next(f for f in scores if "/seed1/energy/" in f)
    out = dumps["root"] / "tables"
    with pytest.raises(
        ValueError,
        match=re.escape(f"{first_orphan}: no ID test scores of energy for the same model"),
    ):
        write_tables(scores, dumps["features"], BENCHMARKS, out / "all.csv", out)
    assert_nothing_written(out)


def test_error_dataset_not_in_benchmark(dumps):
    bad = write_score_file(dumps["root"] / "extra", 0, "msp", "mnist", [0.3, 0.1, 0.2])
    out = dumps["root"] / "tables"
    with pytest.raises(
        ValueError, match=re.escape(f"{bad}: 'mnist' is not an OOD set of benchmark '{BENCH}'")
    ):
        write_tables([*dumps["scores"], bad], dumps["features"], BENCHMARKS, out / "all.csv", out)
    assert_nothing_written(out)


def test_error_no_id_feature_dump(dumps):
    out = dumps["root"] / "tables"
    with pytest.raises(
        ValueError,
        match=re.escape(f"no ID test feature dump for ('{BENCH}', '{METHOD}', '{BACKBONE}', '1')"),
    ):
        write_tables(dumps["scores"], dumps["features"][:1], BENCHMARKS, out / "all.csv", out)
    assert_nothing_written(out)


@pytest.mark.parametrize("key", ["features.seed", "features.dataset", "scorer"])
def test_error_score_metadata_lacks_key(dumps, key):
    bad = write_score_file(dumps["root"] / "bare", 0, "msp", "svhn", [0.5], {key: None})
    with pytest.raises(
        ValueError, match=re.escape(f"{bad}: metadata lacks '{key}'; not an oodbench dump?")
    ):
        build_long_table([*dumps["scores"], bad], dumps["features"], BENCHMARKS)


def test_error_no_score_files(dumps):
    out = dumps["root"] / "tables"
    for scores in ([], list(dumps["id_scores"].values())):  # none, or only ID scores
        with pytest.raises(ValueError, match="no OOD score files given: nothing to tabulate"):
            write_tables(scores, dumps["features"], BENCHMARKS, out / "all.csv", out)
        assert_nothing_written(out)


def test_error_duplicate_score_file(dumps):
    """A second dump of one (model, scorer, dataset) would silently replace or double a row."""
    first = next(f for f in dumps["scores"] if "/seed0/msp/" in f and "cifar100" in f)
    copy = write_score_file(dumps["root"] / "copy", 0, "msp", "cifar100", [0.1, 0.2, 0.3])
    out = dumps["root"] / "tables"
    with pytest.raises(
        ValueError, match=re.escape(f"{copy}: same model, scorer variant and dataset as {first}")
    ):
        write_tables([*dumps["scores"], copy], dumps["features"], BENCHMARKS, out / "all.csv", out)
    assert_nothing_written(out)


def test_rows_cite_the_manifests(dumps):
    table = build_long_table(dumps["scores"], dumps["features"], BENCHMARKS)
    assert set(table.id_manifest_sha256) == {manifest_digest(ID_SET)}
    for row in table.itertuples():
        assert row.ood_manifest_sha256 == manifest_digest(row.ood_dataset)
    text = wide_markdown(table, BENCH, BENCHMARKS)
    assert f"- {ID_SET}: `{manifest_digest(ID_SET)[:16]}`" in text
    assert f"- svhn: `{manifest_digest('svhn')[:16]}`" in text
