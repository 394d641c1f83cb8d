# Config validation and input functions. Kept cheap: every cluster job re-parses this.
import json
import shlex

from ood.config import (
    load_yaml,
    method_backbone,
    scorer_skip_reason,
    synthesis_pipeline,
    to_json,
    train_settings,
    validate_config,
)
from ood.scores import scorer_class
from ood.scores.variants import VARIANT_PATTERN, expand_all

if not config:
    # No --configfile given: the embedded demo. (A `configfile:` directive would
    # instead merge the demo into every user config.)
    config.update(load_yaml(f"{workflow.basedir}/config/config.yaml"))
validate_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")

BENCHMARKS = config["benchmarks"]
NAME = "[A-Za-z0-9_]+"
# Per benchmark: variant id -> (registry scorer, parameters); grids expanded.
VARIANTS = {b: expand_all(bench["scorers"]) for b, bench in BENCHMARKS.items()}


wildcard_constraints:
    benchmark=NAME,
    method=NAME,
    dataset=NAME,
    scorer=VARIANT_PATTERN,
    seed=r"\d+",
    split="train|test",
    synth=NAME,
    shard=r"\d+",
    shards=r"\d+",


def manifest(dataset):
    return f"resources/data/{dataset}/manifest.csv"


def download_dir(download):
    return f"resources/downloads/{download}"


def parent_dataset(dataset):
    """The curated dataset a `class_subset` dataset selects from, else None."""
    spec = config["datasets"][dataset]
    return spec["params"]["of"] if spec["source"] == "class_subset" else None


def curate_inputs(w):
    parent = parent_dataset(w.dataset)
    if parent:
        return {"dataset": manifest(parent)}
    roles = config["datasets"][w.dataset].get("inputs", {})
    return {role: download_dir(name) for role, name in roles.items()}


def source_dirs(w):
    """Role -> folder a source reads: a `format: dir` download is a link inside its dir."""
    parent = parent_dataset(w.dataset)
    if parent:
        return {"dataset": f"resources/data/{parent}"}
    return {
        role: source_dir(name)
        for role, name in config["datasets"][w.dataset].get("inputs", {}).items()
    }


def source_dir(download):
    from ood.data.download import check_spec

    spec = check_spec(download, config["downloads"][download])
    if spec["format"] == "dir":
        return f"{download_dir(download)}/{spec['filename']}"
    return download_dir(download)


def curation_spec(dataset):
    """What `ood curate` needs: the inputs travel as paths in their own argument."""
    return {k: v for k, v in config["datasets"][dataset].items() if k != "inputs"}


def audit_dir(benchmark, dataset):
    return f"results/audit/{benchmark}/{dataset}"


def deduplicated(benchmark, dataset):
    return dataset in BENCHMARKS[benchmark]["audit"]["drop"]


def dataset_manifest(benchmark, dataset):
    """The manifest a benchmark reads: the audited, de-duplicated copy where asked."""
    if deduplicated(benchmark, dataset):
        return f"{audit_dir(benchmark, dataset)}/dedup/manifest.csv"
    return manifest(dataset)


def ood_datasets(bench):
    return [name for names in bench["ood"].values() for name in names]


def role(benchmark, dataset):
    return "id" if dataset == BENCHMARKS[benchmark]["id_dataset"] else "ood"


def outlier_set(benchmark, method):
    """The manifest of the auxiliary outliers a method trains on: a synthesised set of
    the benchmark or a curated dataset (config `outliers`); None without one."""
    name = BENCHMARKS[benchmark]["methods"][method].get("outliers")
    if name is None:
        return None
    if name in BENCHMARKS[benchmark].get("synthesis", {}):
        return f"results/outliers/{benchmark}/{name}/set/manifest.csv"
    return manifest(name)


def synth_spec(w):
    return BENCHMARKS[w.benchmark]["synthesis"][w.synth]


def synth_pipeline(w):
    return synthesis_pipeline(synth_spec(w))


def synth_root(w):
    return f"results/outliers/{w.benchmark}/{w.synth}"


def benchmark_images(benchmark):
    """memory or stream: how the benchmark's models read images (train setting images)."""
    return BENCHMARKS[benchmark].get("train", {}).get("images", "memory")


def synth_embed_settings(w):
    """Embedding settings; the image encoder and how it reads images default to the
    benchmark's backbone and train setting."""
    return {
        "encoder": BENCHMARKS[w.benchmark]["backbone"],
        "images": benchmark_images(w.benchmark),
        **synth_spec(w).get("embed", {}),
    }


def synth_shards(w):
    count = synth_spec(w).get("shards", 1)
    return [f"{synth_root(w)}/shards/{i}of{count}.csv" for i in range(1, count + 1)]


def method_spec(w):
    return BENCHMARKS[w.benchmark]["methods"][w.method]


def method_model(w, method):
    """Another method's model of the same benchmark and seed (init, teacher)."""
    return f"results/models/{w.benchmark}/{method}/seed{w.seed}/model.pt"


def method_settings(w):
    """The training settings of one model; `init` becomes the pretrained path."""
    settings = train_settings(BENCHMARKS[w.benchmark], w.method)
    init = method_spec(w).get("init")
    if init:
        settings["pretrained"] = method_model(w, init)
    return settings


def train_inputs(w):
    inputs = {"manifest": manifest(BENCHMARKS[w.benchmark]["id_dataset"])}
    spec = method_spec(w)
    outliers = outlier_set(w.benchmark, w.method)
    if outliers:
        inputs["outliers"] = outliers
    settings = method_settings(w)
    if settings.get("pretrained"):
        inputs["pretrained"] = settings["pretrained"]
    teacher = spec.get("teacher")
    if teacher:
        inputs["teacher"] = (
            method_model(w, teacher)
            if isinstance(teacher, str)
            else teacher["checkpoint"]
        )
    groups = settings.get("method_params", {}).get("groups")
    if isinstance(groups, str):  # mos: a class -> group file
        inputs["groups"] = groups
    return inputs


def train_extra_args(w):
    """--outliers and --teacher of the methods that take them."""
    args = []
    outliers = outlier_set(w.benchmark, w.method)
    if outliers:
        args.append(f"--outliers {outliers}")
    teacher = method_spec(w).get("teacher")
    if isinstance(teacher, str):
        args.append(f"--teacher {method_model(w, teacher)}")
    elif teacher:
        args.append(
            f"--teacher {shlex.quote(teacher['checkpoint'])}"
            f" --teacher-backbone {teacher['backbone']}"
        )
    return " ".join(args)


def model_dir(w):
    return f"results/models/{w.benchmark}/{w.method}/seed{w.seed}"


def feature_path(benchmark, method, seed, split, dataset):
    return f"results/features/{benchmark}/{method}/seed{seed}/{split}/{dataset}.parquet"


def variant(w):
    """(registry scorer, parameters) of the `scorer` wildcard (a variant id)."""
    try:
        return VARIANTS[w.benchmark][w.scorer]
    except KeyError:
        known = ", ".join(VARIANTS.get(w.benchmark, {}))
        raise ValueError(
            f"{w.scorer!r} is not a scorer variant of benchmark {w.benchmark!r}; known: {known}"
        ) from None


def scorer_needs(w):
    return set(scorer_class(variant(w)[0]).needs)


def fits_on_train_images(w):
    """Only model scorers whose fit reads the train images (mahalanobis_ens) need them."""
    cls = scorer_class(variant(w)[0])
    return "model" in cls.needs and cls.fits and cls.fit_images


def benchmark_datasets(benchmark):
    """The sets a score job scores: the ID test set, then the OOD sets by name (an
    order that reordering the config's groups does not change, so neither do the
    job's params)."""
    bench = BENCHMARKS[benchmark]
    return [bench["id_dataset"], *sorted(ood_datasets(bench))]


def score_dir(benchmark, method, seed, scorer):
    return f"results/scores/{benchmark}/{method}/seed{seed}/{scorer}"


def score_inputs(w):
    bench = BENCHMARKS[w.benchmark]
    name, _ = variant(w)
    reason = scorer_skip_reason(BENCHMARKS[w.benchmark], w.method, name)
    if reason:
        raise ValueError(
            f"scorer {name!r} does not run on method {w.method!r}: it {reason}"
        )
    datasets = benchmark_datasets(w.benchmark)
    inputs = {
        "test": [
            feature_path(w.benchmark, w.method, w.seed, "test", d) for d in datasets
        ]
    }
    if scorer_class(name).fits:
        inputs["train"] = feature_path(
            w.benchmark, w.method, w.seed, "train", bench["id_dataset"]
        )
    needs = scorer_needs(w)
    if needs & {"head", "model"}:
        inputs["model"] = f"{model_dir(w)}/model.pt"
    if "model" in needs:
        inputs["test_data"] = [feature_inputs_data(w.benchmark, d) for d in datasets]
        if fits_on_train_images(w):
            inputs["train_data"] = feature_inputs_data(w.benchmark, bench["id_dataset"])
    return inputs


def score_args(w):
    """`ood score` arguments of one job: scorer, variant, parameters, the dumps to
    score with one output each, the train dump of fitting scorers, and the
    checkpoint and manifests of scorers needing the head or the model.

    One function of the wildcards only: Snakemake inspects every callable of every
    job (score jobs are most of the DAG), and a params function taking input or
    output would be left out of the params rerun trigger.
    """
    name, params = variant(w)
    datasets = benchmark_datasets(w.benchmark)
    tests = [feature_path(w.benchmark, w.method, w.seed, "test", d) for d in datasets]
    outs = [
        f"{score_dir(w.benchmark, w.method, w.seed, w.scorer)}/{d}.parquet"
        for d in datasets
    ]
    args = [
        f"--scorer {name} --variant {w.scorer} --params {shlex.quote(to_json(params))}"
    ]
    args.append(f"--test {' '.join(tests)} --out {' '.join(outs)}")
    id_dataset = BENCHMARKS[w.benchmark]["id_dataset"]
    if scorer_class(name).fits:
        args.append(
            f"--train {feature_path(w.benchmark, w.method, w.seed, 'train', id_dataset)}"
        )
    needs = scorer_needs(w)
    if needs & {"head", "model"}:
        args.append(f"--checkpoint {model_dir(w)}/model.pt")
    if "model" in needs:
        manifests = [dataset_manifest(w.benchmark, d) for d in datasets]
        args.append(f"--test-manifest {' '.join(manifests)}")
        if fits_on_train_images(w):
            args.append(f"--train-manifest {dataset_manifest(w.benchmark, id_dataset)}")
    args.append(f"--device {config['device']}")
    return " ".join(args)


def needs_views(benchmark, method):
    """Whether the method's dumps must carry the multi-scale views (csd is configured)."""
    return any(
        "views" in scorer_class(name).needs
        and not scorer_skip_reason(BENCHMARKS[benchmark], method, name)
        for name, _ in VARIANTS[benchmark].values()
    )


def feature_inputs_data(benchmark, dataset):
    if deduplicated(benchmark, dataset):
        return audit_dir(benchmark, dataset)
    return manifest(dataset)


def feature_inputs(w):
    bench = BENCHMARKS[w.benchmark]
    if w.split == "train" and w.dataset != bench["id_dataset"]:
        raise ValueError(f"only the ID dataset has a train split, not {w.dataset!r}")
    return {
        "model": f"{model_dir(w)}/model.pt",
        "data": feature_inputs_data(w.benchmark, w.dataset),
    }


def models(bench_name):
    bench = BENCHMARKS[bench_name]
    return [(m, s) for m in bench["methods"] for s in bench["seeds"]]


def score_dirs(b):
    """Every (model, variant) score folder of benchmark b, for the variants that
    apply to the method."""
    return [
        score_dir(b, m, s, v)
        for m, s in models(b)
        for v, (name, _) in VARIANTS[b].items()
        if not scorer_skip_reason(BENCHMARKS[b], m, name)
    ]


def score_files(b):
    """The score dumps inside score_dirs(b): one per scored set."""
    return [
        f"{d}/{dataset}.parquet"
        for d in score_dirs(b)
        for dataset in benchmark_datasets(b)
    ]


def audits(b):
    return [audit_dir(b, dataset) for dataset in ood_datasets(BENCHMARKS[b])]


def id_test_features(b):
    bench = BENCHMARKS[b]
    return [feature_path(b, m, s, "test", bench["id_dataset"]) for m, s in models(b)]


def benchmark_group(b):
    bench = BENCHMARKS[b]
    return to_json({b: {"id_dataset": bench["id_dataset"], "ood": bench["ood"]}})
