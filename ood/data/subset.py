"""`class_subset`: a dataset made of some classes of another curated dataset.

The one-class protocol (MOOD; `benchmarks.<b>.one_class`) takes each class of
the ID dataset in turn as the whole ID set and the test images of the other
classes as OOD; both are subsets of the already curated ID dataset, so they
copy its image files (same bytes, same sha256) rather than reading the
download again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ood.data.real import Inputs, Record

SPLITS = ("train", "test")
INPUTS = ("dataset",)  # the curated dataset (the workflow passes resources/data/<of>)
DEFAULTS = {"of": None, "classes": None, "exclude": [], "splits": list(SPLITS), "relabel": True}


def _class_list(key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(
            f"class_subset: param {key!r} must be a list of class ids >= 0, got {value!r}"
        )
    return value


def class_subset(params: dict[str, Any], inputs: Inputs | None = None) -> Iterator[Record]:
    """The rows of `inputs["dataset"]` whose class is in `classes` (all if None) and not
    in `exclude`, from `splits`. With `relabel`, kept classes become 0..k-1 in the
    order of `classes` (sorted when `classes` is None)."""
    from ood.data.manifest import read_manifest, row_file

    if not inputs or "dataset" not in inputs or not Path(inputs["dataset"]).is_dir():
        raise ValueError("class_subset: input 'dataset' must be a curated dataset directory")
    source = Path(inputs["dataset"])
    classes = params["classes"]
    if classes is not None:
        classes = _class_list("classes", classes)
    exclude = set(_class_list("exclude", params["exclude"]))
    splits = params["splits"]
    if not isinstance(splits, list) or not splits or set(splits) - set(SPLITS):
        raise ValueError(f"class_subset: param 'splits' must list some of {SPLITS}, got {splits!r}")
    rows = read_manifest(source)
    present = sorted({row.label for row in rows})
    if classes is not None:
        missing = sorted(set(classes) - set(present))
        if missing:
            raise ValueError(
                f"class_subset: class(es) {missing} not in {source} (it has {present})"
            )
    kept = [c for c in (classes if classes is not None else present) if c not in exclude]
    if not kept:
        raise ValueError(f"class_subset: no class of {source} is left to keep")
    label = {c: (i if params["relabel"] else c) for i, c in enumerate(kept)}
    selected = [r for r in rows if r.label in label and r.split in splits]
    if not selected:
        raise ValueError(f"class_subset: {source} has no image of classes {kept} in {splits}")

    def generate() -> Iterator[Record]:
        for row in selected:
            yield row.split, label[row.label], Path(row_file(source, row))

    return generate()
