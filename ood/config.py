"""Checks on a config that JSON schema cannot express, run at Snakefile parse time.

Everything here must stay cheap to import: no torch, no faiss.
"""

from __future__ import annotations

import json


class ConfigError(ValueError):
    """A config names something unknown or inconsistent; the message names the key."""


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def validate_schema(config: dict, schema_path: str) -> None:
    """Validate against the JSON schema with a one-line error naming the key.

    Snakemake's `validate` (which also fills in defaults) runs after this; its
    own message is correct but buries the key under a dump of the schema.
    """
    import jsonschema

    schema = load_yaml(schema_path)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ConfigError(f"config {where}: {error.message}")


def validate_config(config: dict, schema_path: str) -> None:
    """Everything the Snakefile checks at parse time; fills in schema defaults."""
    from snakemake.utils import validate

    validate_schema(config, schema_path)
    validate(config, schema_path)  # same schema, passes; run for its defaults
    check_config(config)


def check_config(config: dict) -> None:
    from ood.data.demo import SOURCES
    from ood.data.download import check_spec
    from ood.models.specs import BACKBONES
    from ood.train import METHOD_SPATIAL, METHODS

    datasets = config["datasets"]
    downloads = config.get("downloads", {})
    for name, spec in downloads.items():
        try:
            check_spec(name, spec)
        except ValueError as exc:
            raise ConfigError(f"downloads.{name}: {exc}") from None
    for name, spec in datasets.items():
        if spec["source"] not in SOURCES:
            raise ConfigError(
                f"datasets.{name}.source: unknown source {spec['source']!r}; "
                f"known: {', '.join(sorted(SOURCES))}"
            )
        for role, download in spec.get("inputs", {}).items():
            if download not in downloads:
                raise ConfigError(
                    f"datasets.{name}.inputs.{role}: {download!r} is not in downloads"
                )
    for bench_name, bench in config["benchmarks"].items():
        where = f"benchmarks.{bench_name}"
        if bench_name == "all":
            raise ConfigError(f"{where}: 'all' is taken by results/tables/all.csv; rename it")
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
        for name in bench.get("audit", {}).get("drop", []):
            if name not in seen or name == bench["id_dataset"]:
                raise ConfigError(f"{where}.audit.drop: {name!r} is not an OOD set of {bench_name}")
        if bench["backbone"] not in BACKBONES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {bench['backbone']!r}; "
                f"known: {', '.join(sorted(BACKBONES))}"
            )
        for method, spec in bench["methods"].items():
            if method not in METHODS:
                raise ConfigError(
                    f"{where}.methods: unknown method {method!r}; known: {', '.join(METHODS)}"
                )
            check_outliers(f"{where}.methods.{method}", method, spec, seen, datasets)
            if method in METHOD_SPATIAL and not BACKBONES[bench["backbone"]].spatial:
                raise ConfigError(
                    f"{where}.methods.{method}: trains on the last feature map, which backbone "
                    f"{bench['backbone']!r} does not have"
                )
        check_scorers(where, bench)


def check_outliers(where: str, method: str, spec: dict, used: dict, datasets: dict) -> None:
    """A method training on outliers names a dataset that no test role of the benchmark uses."""
    from ood.train import method_needs_outliers

    name = spec.get("outliers")
    if not method_needs_outliers(method):
        if name is not None:
            raise ConfigError(f"{where}.outliers: method {method!r} trains on no outlier set")
        return
    if name is None:
        raise ConfigError(
            f"{where}.outliers: method {method!r} trains on an auxiliary outlier set; "
            "name a dataset"
        )
    if name not in datasets:
        raise ConfigError(f"{where}.outliers: {name!r} is not in datasets")
    if name in used:
        # Training on a test set would measure nothing.
        raise ConfigError(f"{where}.outliers: {name!r} is the benchmark's {used[name]}")


def check_scorers(where: str, bench: dict) -> None:
    """Each variant builds (known name, valid parameters) and applies to some method."""
    from ood.models.specs import BACKBONES
    from ood.scores import applies, get_scorer, scorer_class
    from ood.scores.variants import expand
    from ood.train import method_head

    heads = {method: method_head(method) for method in bench["methods"]}
    seen: dict[str, str] = {}
    for scorer, params in bench["scorers"].items():
        at = f"{where}.scorers.{scorer}"
        try:
            variants = expand(scorer, params)
            for concrete in variants.values():
                get_scorer(scorer, concrete)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{at}: {_message(exc)}") from None
        for variant in variants:
            if variant in seen:
                raise ConfigError(f"{at}: variant {variant!r} is also made by {seen[variant]}")
            seen[variant] = at
        needs = scorer_class(scorer).needs
        if "views" in needs and not BACKBONES[bench["backbone"]].spatial:
            raise ConfigError(
                f"{at}: needs multi-scale views of the last feature map, which backbone "
                f"{bench['backbone']!r} does not have"
            )
        if not any(applies(scorer, head) for head in heads.values()):
            listed = ", ".join(f"{m} ({h} head)" for m, h in heads.items())
            wanted = (
                "a group-softmax model (method mos)"
                if "groups" in needs
                else "a model with one softmax over the classes"
            )
            raise ConfigError(f"{at}: applies to {wanted}; this benchmark's methods are {listed}")


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
