"""Curate one dataset from a config spec: run its source, write images + manifest."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

from ood.data.demo import INPUTS, get_source, resolve_params
from ood.data.manifest import SPLITS, manifest_sha256, read_manifest, write_dataset

SPEC_KEYS = ("source", "params", "stated_size")


def curate(
    name: str,
    spec: dict[str, Any],
    out_dir: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Build dataset `name` from `{"source": ..., "params": {...}}`; return its manifest path.

    `inputs` maps the source's input roles (`INPUTS[source]`) to the
    directories the download stage produced; demo sources take none.
    Parameters are resolved against the source's defaults and validated, and
    the inputs checked, before anything is written; the resolved spec is kept
    in `dataset.json`. An optional `stated_size` (the size the papers state:
    an int for the whole set, or `{split: n}`) is compared with the result,
    and a mismatch is flagged with a WARNING in the summary line, not raised.
    """
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"dataset {name!r}: spec must be a mapping with a 'source' key")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"dataset {name!r}: unknown spec key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(SPEC_KEYS)}"
        )
    source = get_source(spec["source"])
    stated = _check_stated_size(name, spec.get("stated_size"))
    dirs = _check_inputs(name, spec["source"], inputs)
    params = resolve_params(spec["source"], spec.get("params"))
    records = source(params, dirs)  # validates eagerly, before write_dataset creates anything
    info = {"name": name, "source": spec["source"], "params": params}
    info["inputs"] = {role: str(path) for role, path in dirs.items()}
    if stated is not None:
        info["stated_size"] = stated
    manifest = write_dataset(out_dir, records, info=json.dumps(info, indent=2) + "\n")
    summary = summarize(out_dir)
    line = (
        f"curated {name}: {_describe(summary)} -> {out_dir} "
        f"(manifest sha256 {manifest_sha256(out_dir)[:12]})"
    )
    mismatch = size_mismatch(summary, stated)
    if mismatch:
        line += f"; WARNING: {mismatch}"
    print(line, file=sys.stderr)
    return manifest


def _check_inputs(
    name: str, source: str, inputs: Mapping[str, str | os.PathLike] | None
) -> dict[str, Path]:
    """The input directories by role: exactly the roles the source declares, all existing."""
    given = dict(inputs or {})
    declared = INPUTS[source]
    missing = [role for role in declared if role not in given]
    unexpected = sorted(map(str, set(given) - set(declared)))
    if missing or unexpected:
        wanted = ", ".join(declared) if declared else "none"
        problems = [f"source {source!r} takes input role(s): {wanted}"]
        if missing:
            problems.append(f"missing: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected: {', '.join(unexpected)}")
        raise ValueError(f"dataset {name!r}: {'; '.join(problems)}")
    dirs = {role: Path(given[role]) for role in declared}
    for role, path in dirs.items():
        if not path.is_dir():
            raise ValueError(f"dataset {name!r}: input {role!r}: {path} is not a directory")
    return dirs


def _positive_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def _check_stated_size(name: str, stated: Any) -> int | dict[str, int] | None:
    if stated is None or _positive_int(stated):
        return stated if stated is None else int(stated)
    if (
        isinstance(stated, Mapping)
        and stated
        and all(split in SPLITS and _positive_int(n) for split, n in stated.items())
    ):
        return {split: int(n) for split, n in stated.items()}
    raise ValueError(
        f"dataset {name!r}: stated_size must be a positive int or a mapping "
        f"{{split: positive int}} with splits in {SPLITS}, got {stated!r}"
    )


def size_mismatch(summary: dict[str, Any], stated: int | Mapping[str, int] | None) -> str:
    """'' if the summary agrees with the stated size, else what differs."""
    if stated is None:
        return ""
    if not isinstance(stated, Mapping):
        n = summary["n"]
        return "" if n == stated else f"{n} images, the papers state {stated}"
    differ = []
    for split, expected in stated.items():
        n = summary["splits"].get(split, {"n": 0})["n"]
        if n != expected:
            differ.append(f"{split} has {n} images, the papers state {expected}")
    return "; ".join(differ)


def summarize(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """`{"n": N, "splits": {split: {"n": n, "labels": {label: count}}}}` from the manifest."""
    rows = read_manifest(dataset_dir)
    splits: dict[str, Any] = {}
    for split in sorted({row.split for row in rows}, key=SPLITS.index):
        counts = Counter(row.label for row in rows if row.split == split)
        splits[split] = {"n": sum(counts.values()), "labels": dict(sorted(counts.items()))}
    return {"n": len(rows), "splits": splits}


def _describe(summary: dict[str, Any]) -> str:
    parts = []
    for split, counts in summary["splits"].items():
        k = len(counts["labels"])
        parts.append(f"{split} {counts['n']} ({k} label{'s' if k != 1 else ''})")
    return f"{summary['n']} images: " + ", ".join(parts)
