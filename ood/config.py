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
    expand_one_class(config)
    check_config(config)


def expand_one_class(config: dict) -> None:
    """Replace each benchmark with `one_class: [c, ...]` by one benchmark per class.

    `<b>_class<c>`: ID = class c of the ID dataset (both splits, label 0); near-OOD
    = the test images of every other class; far-OOD as configured. The subsets are
    `class_subset` datasets of the curated ID dataset.
    """
    import copy

    datasets, benchmarks = config["datasets"], config["benchmarks"]
    for name in [b for b, bench in benchmarks.items() if bench.get("one_class")]:
        bench = benchmarks.pop(name)
        parent = bench["id_dataset"]
        if parent not in datasets:
            raise ConfigError(f"benchmarks.{name}.id_dataset: {parent!r} is not in datasets")
        for c in bench["one_class"]:
            inside, outside = f"{parent}_class{c}", f"{parent}_not{c}"
            for key, params in (
                (inside, {"of": parent, "classes": [c]}),
                (outside, {"of": parent, "exclude": [c], "splits": ["test"], "relabel": False}),
            ):
                if key in datasets:
                    raise ConfigError(
                        f"benchmarks.{name}.one_class: dataset {key!r} exists already"
                    )
                datasets[key] = {"source": "class_subset", "params": params}
            derived = f"{name}_class{c}"
            if derived in benchmarks:
                raise ConfigError(
                    f"benchmarks.{name}.one_class: benchmark {derived!r} exists already"
                )
            one = copy.deepcopy({k: v for k, v in bench.items() if k != "one_class"})
            one["id_dataset"] = inside
            one["ood"] = {"near": [outside], "far": list(bench["ood"].get("far", []))}
            drop = one.get("audit", {}).get("drop", [])
            one.setdefault("audit", {})["drop"] = [d for d in drop if d in one["ood"]["far"]]
            benchmarks[derived] = one


def check_config(config: dict) -> None:
    from ood.data.demo import SOURCES
    from ood.data.download import check_spec
    from ood.models.specs import BACKBONES

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
        if spec["source"] == "class_subset":
            parent = spec.get("params", {}).get("of")
            if parent not in datasets or parent == name:
                raise ConfigError(
                    f"datasets.{name}.params.of: a class_subset names another dataset, "
                    f"got {parent!r}"
                )
            if spec.get("inputs"):
                raise ConfigError(f"datasets.{name}.inputs: a class_subset reads its 'of' dataset")
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
        check_synthesis(where, bench, datasets)
        check_methods(where, bench, seen, datasets)
        check_scorers(where, bench)


def method_backbone(bench: dict, method: str) -> str:
    """The backbone a method trains: its own `backbone` key, else the benchmark's."""
    return bench["methods"][method].get("backbone") or bench["backbone"]


def check_methods(where: str, bench: dict, used: dict, datasets: dict) -> None:
    from ood.models.specs import BACKBONES
    from ood.train import METHOD_PARAMS, METHOD_SPATIAL, METHOD_TEACHER, METHOD_TOKENS, METHODS

    methods = bench["methods"]
    for method, spec in methods.items():
        at = f"{where}.methods.{method}"
        if method not in METHODS:
            raise ConfigError(
                f"{where}.methods: unknown method {method!r}; known: {', '.join(METHODS)}"
            )
        check_outliers(at, method, spec, used, datasets, bench.get("synthesis", {}))
        given = train_settings(bench, method).get("method_params", {})
        unknown = sorted(set(given) - set(METHOD_PARAMS[method]))
        if unknown:
            known = ", ".join(METHOD_PARAMS[method]) or "none"
            raise ConfigError(
                f"{at}.train.method_params: unknown parameter(s) {', '.join(unknown)} "
                f"of method {method!r}; known: {known}"
            )
        backbone = method_backbone(bench, method)
        key = f"{at}.backbone" if spec.get("backbone") else f"{where}.backbone"
        if backbone not in BACKBONES:
            raise ConfigError(
                f"{key}: unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}"
            )
        if method in METHOD_SPATIAL and not BACKBONES[backbone].spatial:
            raise ConfigError(
                f"{at}: trains on the last feature map, which backbone {backbone!r} does not have"
            )
        if method in METHOD_TOKENS and not BACKBONES[backbone].tokens:
            raise ConfigError(
                f"{at}: masks patch tokens, which backbone {backbone!r} does not have; "
                f"give methods.{method}.backbone a BEiT/ViT (e.g. beit_tiny_32)"
            )
        if "init" in spec:
            if spec.get("train", {}).get("pretrained") or bench.get("train", {}).get("pretrained"):
                raise ConfigError(f"{at}.init: give init or train.pretrained, not both")
            _check_model_ref(f"{at}.init", method, spec["init"], methods)
            if method_backbone(bench, spec["init"]) != backbone:
                raise ConfigError(
                    f"{at}.init: {spec['init']!r} trains backbone "
                    f"{method_backbone(bench, spec['init'])!r}, {method!r} trains {backbone!r}"
                )
        teacher = spec.get("teacher")
        if method in METHOD_TEACHER and teacher is None:
            raise ConfigError(
                f"{at}.teacher: method {method!r} distils from a teacher; name a method of "
                "this benchmark or give {checkpoint, backbone}"
            )
        if teacher is not None and method not in METHOD_TEACHER:
            raise ConfigError(f"{at}.teacher: method {method!r} takes no teacher")
        if isinstance(teacher, str):
            _check_model_ref(f"{at}.teacher", method, teacher, methods)
        elif isinstance(teacher, dict) and teacher["backbone"] not in BACKBONES:
            raise ConfigError(
                f"{at}.teacher.backbone: unknown backbone {teacher['backbone']!r}; "
                f"known: {', '.join(sorted(BACKBONES))}"
            )
        for scorer in spec.get("scorers", []):
            if scorer not in bench["scorers"]:
                raise ConfigError(
                    f"{at}.scorers: {scorer!r} is not one of the benchmark's scorers "
                    f"({', '.join(bench['scorers'])})"
                )
            reason = scorer_skip_reason(bench, method, scorer, listed=False)
            if reason:
                raise ConfigError(f"{at}.scorers: {scorer!r} {reason}")
    _check_acyclic(where, methods)


def user_files(bench: dict) -> list[str]:
    """Files a user provides for a benchmark: pretrained weights, teacher checkpoints,
    group files (inputs of the train jobs) and Stable Diffusion folders (synthesis)."""
    files = [
        synthesis_pipeline(spec)
        for spec in bench.get("synthesis", {}).values()
        if spec["pipeline"] != TINY_PIPELINE
    ]
    for method, spec in bench["methods"].items():
        settings = train_settings(bench, method)
        teacher = spec.get("teacher")
        for path in (
            settings.get("pretrained"),
            settings.get("method_params", {}).get("groups"),
            teacher["checkpoint"] if isinstance(teacher, dict) else None,
        ):
            if isinstance(path, str) and path not in files:
                files.append(path)
    return files


def model_dependencies(spec: dict) -> list[str]:
    """The methods of the same benchmark whose trained model this method reads."""
    return [ref for ref in (spec.get("init"), spec.get("teacher")) if isinstance(ref, str)]


def _check_model_ref(key: str, method: str, ref: str, methods: dict) -> None:
    if ref == method:
        raise ConfigError(f"{key}: {method!r} cannot start from or learn from itself")
    if ref not in methods:
        raise ConfigError(f"{key}: {ref!r} is not a method of this benchmark")


def _check_acyclic(where: str, methods: dict) -> None:
    def visit(method: str, path: tuple[str, ...]) -> None:
        for ref in model_dependencies(methods[method]):
            if ref in path:
                cycle = " -> ".join((*path, ref))
                raise ConfigError(
                    f"{where}.methods: models depend on each other in a cycle: {cycle}"
                )
            visit(ref, (*path, ref))

    for method in methods:
        visit(method, (method,))


def scorer_skip_reason(bench: dict, method: str, scorer: str, listed: bool = True) -> str | None:
    """Why `scorer` does not run on `method`'s models, or None when it does.

    It must fit the head (group vs flat softmax), find a spatial feature map if
    it reads multi-scale views, and (with `listed`) be in the method's
    `scorers` list when the method has one.
    """
    from ood.models.specs import BACKBONES
    from ood.scores import applies, scorer_class
    from ood.train import method_head

    head = method_head(method)
    if not applies(scorer, head):
        if "groups" in scorer_class(scorer).needs:
            return "applies to group-softmax models (method mos) only"
        return f"needs one softmax over the classes; {method!r} trains a {head} head"
    backbone = method_backbone(bench, method)
    if "views" in scorer_class(scorer).needs and not BACKBONES[backbone].spatial:
        return f"needs multi-scale views of a feature map, which backbone {backbone!r} lacks"
    chosen = bench["methods"][method].get("scorers")
    if listed and chosen is not None and scorer not in chosen:
        return "is not in the method's scorers list"
    return None


def check_outliers(
    where: str, method: str, spec: dict, used: dict, datasets: dict, synthesis: dict
) -> None:
    """A method training on outliers names a synthesised set of the benchmark, or a dataset
    that no test role of the benchmark uses."""
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
    if name in synthesis:
        return
    if name not in datasets:
        raise ConfigError(
            f"{where}.outliers: {name!r} is not in datasets nor in the benchmark's synthesis"
        )
    if name in used:
        # Training on a test set would measure nothing.
        raise ConfigError(f"{where}.outliers: {name!r} is the benchmark's {used[name]}")


TINY_PIPELINE = "tiny"


def check_synthesis(where: str, bench: dict, datasets: dict) -> None:
    """Synthesised sets have names of their own; a pipeline folder, if given, is a model folder."""
    for name, spec in bench.get("synthesis", {}).items():
        at = f"{where}.synthesis.{name}"
        if name in datasets:
            raise ConfigError(
                f"{at}: {name!r} is also a dataset; give the synthesised set another name"
            )
        template = spec.get("sample", {}).get("template")
        if template is not None and template.count("{}") != 1:
            raise ConfigError(f"{at}.sample.template: {template!r} must contain {{}} exactly once")
        keep, pool = (spec.get("embed", {}).get(key) for key in ("keep", "pool"))
        if keep is not None and pool is not None and keep > pool:
            raise ConfigError(f"{at}.embed.keep: {keep} exceeds pool ({pool})")


def synthesis_pipeline(spec: dict) -> str:
    """The pipeline folder of a synthesis entry: the workflow's tiny one, or the given path."""
    path = spec["pipeline"]
    return "resources/pipelines/tiny_sd" if path == TINY_PIPELINE else path.rstrip("/")


def check_scorers(where: str, bench: dict) -> None:
    """Each variant builds (known name, valid parameters) and applies to some method."""
    from ood.scores import get_scorer
    from ood.scores.variants import expand

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
        reasons = {m: scorer_skip_reason(bench, m, scorer) for m in bench["methods"]}
        if all(reasons.values()):
            listed = "; ".join(f"{m}: {why}" for m, why in reasons.items())
            raise ConfigError(f"{at}: runs on none of the benchmark's methods ({listed})")


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
