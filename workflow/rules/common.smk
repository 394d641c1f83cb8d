# Config validation and input functions. Kept cheap: every cluster job re-parses this.
import json

from ood.config import load_yaml, to_json, train_settings, validate_config

if not config:
    # No --configfile given: the embedded demo. (A `configfile:` directive would
    # instead merge the demo into every user config.)
    config.update(load_yaml(f"{workflow.basedir}/config/config.yaml"))
validate_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")

BENCHMARKS = config["benchmarks"]
NAME = "[A-Za-z0-9_]+"


wildcard_constraints:
    benchmark=NAME,
    method=NAME,
    dataset=NAME,
    scorer=NAME,
    seed=r"\d+",
    split="train|test",


def manifest(dataset):
    return f"resources/data/{dataset}/manifest.csv"


def ood_datasets(bench):
    return [name for names in bench["ood"].values() for name in names]


def role(benchmark, dataset):
    return "id" if dataset == BENCHMARKS[benchmark]["id_dataset"] else "ood"


def model_dir(w):
    return f"results/models/{w.benchmark}/{w.method}/seed{w.seed}"


def feature_path(benchmark, method, seed, split, dataset):
    return f"results/features/{benchmark}/{method}/seed{seed}/{split}/{dataset}.parquet"


def needs_train_bank(scorer):
    from ood.scores import SCORERS

    return SCORERS[scorer].fits


def score_inputs(w):
    bench = BENCHMARKS[w.benchmark]
    if w.dataset != bench["id_dataset"] and w.dataset not in ood_datasets(bench):
        raise ValueError(f"{w.dataset!r} is not a dataset of benchmark {w.benchmark!r}")
    inputs = {"test": feature_path(w.benchmark, w.method, w.seed, "test", w.dataset)}
    if needs_train_bank(w.scorer):
        inputs["train"] = feature_path(
            w.benchmark, w.method, w.seed, "train", bench["id_dataset"]
        )
    return inputs


def feature_inputs(w):
    bench = BENCHMARKS[w.benchmark]
    if w.split == "train" and w.dataset != bench["id_dataset"]:
        raise ValueError(f"only the ID dataset has a train split, not {w.dataset!r}")
    return {"model": f"{model_dir(w)}/model.pt", "manifest": manifest(w.dataset)}


def models(bench_name):
    bench = BENCHMARKS[bench_name]
    return [(m, s) for m in bench["methods"] for s in bench["seeds"]]


def all_score_files():
    return [
        f"results/scores/{b}/{m}/seed{s}/{scorer}/{dataset}.parquet"
        for b, bench in BENCHMARKS.items()
        for m, s in models(b)
        for scorer in bench["scorers"]
        for dataset in [bench["id_dataset"], *ood_datasets(bench)]
    ]


def all_id_test_features():
    return [
        feature_path(b, m, s, "test", bench["id_dataset"])
        for b, bench in BENCHMARKS.items()
        for m, s in models(b)
    ]


def benchmark_groups():
    return to_json(
        {
            b: {"id_dataset": bench["id_dataset"], "ood": bench["ood"]}
            for b, bench in BENCHMARKS.items()
        }
    )
