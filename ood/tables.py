"""Results tables: the long `all.csv` and a readable wide summary per benchmark.

Every row is identified from the dumps' own metadata (benchmark, method,
backbone, seed, dataset, scorer), so a table cannot silently mix up files;
only the grouping of OOD sets into near/far comes from the config.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ood.groups import class_log_probs
from ood.io import read_features, read_scores, write_text_atomic
from ood.metrics import accuracy, ood_metrics

COLUMNS = [
    "benchmark",
    "id_dataset",
    "ood_dataset",
    "ood_group",
    "method",
    "backbone",
    "scorer",
    "variant",
    "seed",
    "n_id",
    "n_ood",
    "auroc",
    "fpr95",
    "aupr_in",
    "aupr_out",
    "id_acc",
    "scorer_params",
    "id_manifest_sha256",
    "ood_manifest_sha256",
]
METRICS = ["auroc", "fpr95", "aupr_in", "aupr_out"]
MODEL_KEYS = ("benchmark", "method", "backbone", "seed")


def _key(meta: dict, path: os.PathLike | str, prefix: str = "") -> tuple:
    try:
        return tuple(meta[prefix + k] for k in MODEL_KEYS)
    except KeyError as exc:
        missing = exc.args[0]
        raise ValueError(f"{path}: metadata lacks {missing!r}; not an oodbench dump?") from None


def build_long_table(
    score_files: Iterable[str | os.PathLike],
    id_feature_files: Iterable[str | os.PathLike],
    benchmarks: dict,
) -> pd.DataFrame:
    """One row per (benchmark, method, backbone, seed, scorer variant, OOD dataset).

    `benchmarks` maps a benchmark name to {"id_dataset": ..., "ood": {group: [datasets]}}.
    """
    id_acc = {}
    for path in id_feature_files:
        dump = read_features(path)
        logits = dump.logits
        if "group_classes" in dump.metadata:  # group softmax: decode to per-class scores
            groups = json.loads(dump.metadata["group_classes"])
            logits = class_log_probs(logits, groups)
        id_acc[_key(dump.metadata, path)] = accuracy(logits, dump.label)

    id_scores, ood_scores, seen = {}, [], {}
    for path in score_files:
        dump = read_scores(path)
        meta = dump.metadata
        model = _key(meta, path, "features.")
        bench = benchmarks.get(model[0])
        if bench is None:
            raise ValueError(f"{path}: benchmark {model[0]!r} is not in the config")
        missing = [k for k in ("scorer", "features.dataset") if k not in meta]
        if missing:
            raise ValueError(f"{path}: metadata lacks {missing[0]!r}; not an oodbench dump?")
        dataset = meta["features.dataset"]
        # A grid gives several variants of one scorer; older dumps have no variant key.
        variant = meta.get("variant", meta["scorer"])
        entry = (model, meta["scorer"], variant, meta.get("params", "{}"), dataset, dump, path)
        if (model, variant, dataset) in seen:
            raise ValueError(
                f"{path}: same model, scorer variant and dataset as {seen[model, variant, dataset]}"
            )
        seen[(model, variant, dataset)] = path
        if dataset == bench["id_dataset"]:
            id_scores[(model, variant)] = dump
        else:
            ood_scores.append(entry)

    groups = {
        (name, ds): group
        for name, bench in benchmarks.items()
        for group, datasets in bench["ood"].items()
        for ds in datasets
    }
    rows = []
    for model, scorer, variant, params, dataset, ood_dump, path in ood_scores:
        benchmark, method, backbone, seed = model
        if (model, variant) not in id_scores:
            raise ValueError(f"{path}: no ID test scores of {variant} for the same model")
        if model not in id_acc:
            raise ValueError(f"{path}: no ID test feature dump for {model}")
        if (benchmark, dataset) not in groups:
            raise ValueError(f"{path}: {dataset!r} is not an OOD set of benchmark {benchmark!r}")
        id_dump = id_scores[(model, variant)]
        rows.append(
            {
                "benchmark": benchmark,
                "id_dataset": benchmarks[benchmark]["id_dataset"],
                "ood_dataset": dataset,
                "ood_group": groups[(benchmark, dataset)],
                "method": method,
                "backbone": backbone,
                "scorer": scorer,
                "variant": variant,
                "seed": int(seed),
                "n_id": len(id_dump.score),
                "n_ood": len(ood_dump.score),
                **ood_metrics(id_dump.score, ood_dump.score),
                "id_acc": id_acc[model],
                "scorer_params": params,
                # which exact data the row measured: cite these with the numbers
                "id_manifest_sha256": id_dump.metadata.get("features.manifest_sha256", ""),
                "ood_manifest_sha256": ood_dump.metadata.get("features.manifest_sha256", ""),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(
        ["benchmark", "method", "backbone", "seed", "variant", "ood_group", "ood_dataset"],
        ignore_index=True,
        key=lambda column: (
            column.map(_natural_ranks(column)) if column.name == "variant" else column
        ),
    )


def _natural_key(text: str) -> list:
    """'knn-k10' -> ['knn-k', 10, '']: numbers inside names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _natural_ranks(column: pd.Series) -> dict[str, int]:
    """Rank of each distinct value in natural order (knn-k5 < knn-k10 < knn-k50)."""
    return {value: rank for rank, value in enumerate(sorted(set(column), key=_natural_key))}


def _pct(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else "")


def _auroc_fpr_cell(per_seed: pd.DataFrame, seeds: int) -> str:
    """'AUROC / FPR95' over rows that hold one value per seed."""
    if per_seed.empty:
        return "-"
    return " / ".join(
        _pct(per_seed[m].mean(), per_seed[m].std(ddof=0), seeds) for m in ("auroc", "fpr95")
    )


def wide_markdown(table: pd.DataFrame, benchmark: str, benchmarks: dict) -> str:
    """Per benchmark: rows (method, backbone, scorer), AUROC / FPR95 in % per OOD set
    and averaged over the near and far groups; mean ± std over seeds."""
    part = table[table["benchmark"] == benchmark]
    bench = benchmarks[benchmark]
    order = ["near", "far"]  # near-OOD first, as the papers' tables do
    groups = {g: bench["ood"][g] for g in sorted(bench["ood"], key=order.index) if bench["ood"][g]}
    datasets = [d for ds in groups.values() for d in ds]
    header = ["method", "backbone", "scorer", "seeds", "ID acc"]  # scorer cell: the variant id
    header += [f"{d} AUROC / FPR95" for d in datasets]
    header += [f"{g} avg AUROC / FPR95" for g in groups]
    lines = [
        f"# {benchmark}: ID {bench['id_dataset']}",
        "",
        "AUROC and FPR95 in %; FPR95 = OOD accepted at the threshold keeping 95% of ID. "
        "Averages: mean over the group's datasets per seed, then mean ± std over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    # sort=False: the long table's order (variants in natural order, not as text).
    for (method, backbone, scorer), rows in part.groupby(
        ["method", "backbone", "variant"], sort=False
    ):
        seeds = rows["seed"].nunique()
        acc = rows.groupby("seed")["id_acc"].first()
        cells = [method, backbone, scorer, str(seeds), _pct(acc.mean(), acc.std(ddof=0), seeds)]
        for d in datasets:
            cells.append(_auroc_fpr_cell(rows[rows["ood_dataset"] == d], seeds))
        for group in groups:
            per_seed = rows[rows["ood_group"] == group].groupby("seed")[["auroc", "fpr95"]].mean()
            cells.append(_auroc_fpr_cell(per_seed, seeds))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Data (manifest sha256, first 16 hex digits):", ""]
    manifests = dict(zip(part["ood_dataset"], part["ood_manifest_sha256"], strict=True))
    manifests = {bench["id_dataset"]: part["id_manifest_sha256"].iloc[0], **manifests}
    lines += [f"- {name}: `{digest[:16] or 'unknown'}`" for name, digest in manifests.items()]
    return "\n".join(lines) + "\n"


def write_tables(
    score_files: list[str],
    id_feature_files: list[str],
    benchmarks: dict,
    csv_path: str | os.PathLike,
    markdown_dir: str | os.PathLike,
) -> pd.DataFrame:
    table = build_long_table(score_files, id_feature_files, benchmarks)
    if table.empty:
        raise ValueError("no OOD score files given: nothing to tabulate")
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, float_format="%.6f")
    for benchmark in benchmarks:
        text = wide_markdown(table, benchmark, benchmarks)
        write_text_atomic(Path(markdown_dir) / f"{benchmark}.md", text)
    # all.csv last: it is the target users ask for, so it appears only when all is done.
    write_text_atomic(csv_path, buffer.getvalue())
    return table


def concat_tables(csv_paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """all.csv from per-benchmark tables, cells copied as written (no re-rounding)."""
    tables = []
    for path in csv_paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: file not found")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if list(table.columns) != COLUMNS:
            raise ValueError(f"{path}: columns {list(table.columns)} are not those of all.csv")
        tables.append(table)
    if not tables:
        raise ValueError("no tables given: nothing to concatenate")
    # Each table is sorted already; ordering whole tables by benchmark keeps the order
    # build_long_table gives (seed stays numeric-sorted, which a string sort would break).
    tables.sort(key=lambda t: t.benchmark.iloc[0] if len(t) else "")
    table = pd.concat(tables, ignore_index=True)
    keys = [*MODEL_KEYS, "variant", "ood_dataset"]
    repeated = table[table.duplicated(keys, keep=False)]
    if len(repeated):
        row = repeated.iloc[0]
        raise ValueError(
            "the same row is in two tables: " + ", ".join(f"{k}={row[k]}" for k in keys)
        )
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    write_text_atomic(out, buffer.getvalue())
    return table


def load_benchmarks(text: str) -> dict:
    benchmarks = json.loads(text)
    for name, bench in benchmarks.items():
        if "id_dataset" not in bench or "ood" not in bench:
            raise ValueError(f"benchmark {name!r}: needs 'id_dataset' and 'ood'")
    return benchmarks
