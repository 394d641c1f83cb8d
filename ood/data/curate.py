"""Curate one dataset from a config spec: run its source, write images + manifest."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ood.data.demo import get_source, resolve_params
from ood.data.manifest import SPLITS, manifest_sha256, read_manifest, write_dataset

SPEC_KEYS = ("source", "params")


def curate(name: str, spec: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Build dataset `name` from `{"source": ..., "params": {...}}`; return its manifest path.

    Parameters are resolved against the source's defaults and validated
    before anything is written; the resolved spec is kept in `dataset.json`.
    """
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"dataset {name!r}: spec must be a mapping with a 'source' key")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown spec key(s) {', '.join(unknown)}")
    source = get_source(spec["source"])
    params = resolve_params(spec["source"], spec.get("params"))
    records = source(params)  # validates eagerly, before write_dataset creates anything
    info = json.dumps({"name": name, "source": spec["source"], "params": params}, indent=2)
    manifest = write_dataset(out_dir, records, info=info + "\n")
    print(
        f"curated {name}: {_describe(summarize(out_dir))} -> {out_dir} "
        f"(manifest sha256 {manifest_sha256(out_dir)[:12]})",
        file=sys.stderr,
    )
    return manifest


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
