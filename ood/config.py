"""Checks on a config that JSON schema cannot express, run at Snakefile parse time.

Everything here must stay cheap to import: no torch, no faiss.
"""

from __future__ import annotations

import json


class ConfigError(ValueError):
    """A config names something unknown or inconsistent; the message names the key."""


def check_config(config: dict) -> None:
    from ood.data.demo import SOURCES
    from ood.models.specs import BACKBONES
    from ood.scores import get_scorer
    from ood.train import METHODS

    datasets = config["datasets"]
    for name, spec in datasets.items():
        if spec["source"] not in SOURCES:
            raise ConfigError(
                f"datasets.{name}.source: unknown source {spec['source']!r}; "
                f"known: {', '.join(sorted(SOURCES))}"
            )
    for bench_name, bench in config["benchmarks"].items():
        where = f"benchmarks.{bench_name}"
        if bench["id_dataset"] not in datasets:
            raise ConfigError(f"{where}.id_dataset: {bench['id_dataset']!r} is not in datasets")
        seen = {bench["id_dataset"]: "id_dataset"}
        for group, names in bench["ood"].items():
            for name in names:
                if name not in datasets:
                    raise ConfigError(f"{where}.ood.{group}: {name!r} is not in datasets")
                if name in seen:
                    raise ConfigError(f"{where}.ood.{group}: {name!r} is already in {seen[name]}")
                seen[name] = f"ood.{group}"
        if not any(bench["ood"].values()):
            raise ConfigError(f"{where}.ood: names no OOD dataset")
        if bench["backbone"] not in BACKBONES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {bench['backbone']!r}; "
                f"known: {', '.join(sorted(BACKBONES))}"
            )
        for method in bench["methods"]:
            if method not in METHODS:
                raise ConfigError(
                    f"{where}.methods: unknown method {method!r}; known: {', '.join(METHODS)}"
                )
        for scorer, params in bench["scorers"].items():
            try:
                get_scorer(scorer, params)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{where}.scorers.{scorer}: {_message(exc)}") from None


def _message(exc: Exception) -> str:
    # KeyError wraps its message in quotes; show the text itself.
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def train_settings(bench: dict, method: str) -> dict:
    """Benchmark-wide training settings with the method's overrides on top."""
    settings = dict(bench.get("train", {}))
    settings.update(bench["methods"][method].get("train", {}))
    return settings


def to_json(value) -> str:
    """Stable JSON for rule params, so that an unchanged config never triggers a rerun."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
