"""Cost of a full demo table, scored both ways on the same model and data.

  ours  one forward pass per (model, dataset) into a Parquet feature dump
        (ood.features.extract), then every scorer reads the dumps
        (ood.scores.run.score_dumps, one call per scorer for all test sets,
        fitted once, as the workflow's score rule runs it; scorers needing
        the model run their own gradient passes inside it)
  peer  pytorch-ood 0.4.0 detectors used the way its documentation shows:
        each detector fits on a DataLoader of the ID train images and
        predicts batch by batch on the ID test and each OOD test loader,
        running its own forward passes

Both use the same checkpoint (ood.models.backbones.load_checkpoint), the same
images and the same normalisation (ood.train.loop.to_model_input), on the CPU
with the same thread cap. The peer gets its images decoded and normalised in
memory once (its most favourable set-up); image loading is counted once on
each side. Set-up (curating the demo datasets of config/config.yaml and
training one model with ood.train.loop.train) is timed but not compared.
Each step (data, then one per scorer) runs on both sides back to back,
alternating which goes first over --repeats, so that both see the same load
on a shared machine; wall and process CPU time are recorded.

Reported: total seconds ours vs peer over the scorers both have and their
ratio (target >= 5 with >= 10 scorers), and per scorer the AUROC of ID test
vs each OOD test set both ways (ood.metrics.auroc; pytorch-ood returns
outlier scores, so its scores are negated), with the max abs difference,
flagging > --auroc-tol with the reason where the definitions differ.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    RESULTS,
    ROOT,
    env_markdown,
    environment,
    limit_threads,
    md_table,
    result_name,
    timed,
    write_result,
)

TARGET_RATIO = 5.0
TARGET_SCORERS = 10
BATCH_SIZE = 256  # images per batch, both sides (the features rule's default)
QUICK_SKIPS = ("mahalanobis_ens",)  # minutes of FGSM fitting, outside the totals anyway


class PeerModel:
    """The checkpoint's network cut where each pytorch-ood detector wants it."""

    def __init__(self, model: Any, meta: dict) -> None:
        import torch

        self.model = model
        self.std = [float(v) for v in meta["settings"]["std"]]
        self.fc = model.get_classifier()
        # MultiMahalanobis: consecutive modules, each stage's output mean-pooled.
        self.stages = [
            torch.nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1),
            model.layer2,
            model.layer3,
            model.layer4,
        ]

    def features(self, x: Any) -> Any:
        """Penultimate (pooled) feature: the dump's `feature` column."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def feature_map(self, x: Any) -> Any:
        """Last feature map before global pooling (B, D, H, W)."""
        return self.model.forward_features(x)

    def head_on_map(self, feature_map: Any) -> Any:
        return self.model.forward_head(feature_map)

    def pooled_map(self, x: Any) -> Any:
        """The pooled feature as a (B, D, 1, 1) map, for detectors that take maps."""
        return self.features(x)[:, :, None, None]

    def fc_on_map(self, z: Any) -> Any:
        return self.fc(z.flatten(1))


@dataclass(frozen=True)
class Pair:
    """One of our scorers and the pytorch-ood detector that computes the same score."""

    ours: str  # registry name in ood.scores.SCORERS
    peer: str  # class name in pytorch_ood.detector
    build: Callable[[PeerModel, dict], Any]  # (model, our resolved params) -> detector
    grad: bool = False  # the detector needs autograd: no torch.no_grad around it
    differs: str = ""  # why the AUROCs may differ beyond rounding
    counted: bool = True  # in the cost totals (False: not the same computation)
    label: str = ""  # row name when one scorer is compared twice

    @property
    def row(self) -> str:
        return self.label or self.ours


def _detectors() -> Any:
    import pytorch_ood.detector as detectors

    return detectors


# Ours -> pytorch-ood, with the peer's parameters taken from ours.
PAIRS: tuple[Pair, ...] = (
    Pair("msp", "MaxSoftmax", lambda m, p: _detectors().MaxSoftmax(m.model)),
    Pair("maxlogit", "MaxLogit", lambda m, p: _detectors().MaxLogit(m.model)),
    Pair(
        "energy",
        "EnergyBased",
        lambda m, p: _detectors().EnergyBased(m.model, t=p["temperature"]),
    ),
    Pair("entropy", "Entropy", lambda m, p: _detectors().Entropy(m.model)),
    Pair(
        "mahalanobis",
        "Mahalanobis",
        lambda m, p: _detectors().Mahalanobis(m.features),
        differs=(
            "the peer inverts the unnormalised within-class scatter + 1e-6 I in float32 "
            "(torch.linalg.inv); ours takes the pinv of scatter / N in float64: the same "
            "ranking unless the covariance is near-singular"
        ),
    ),
    Pair("knn", "KNN", lambda m, p: _detectors().KNN(m.features, k=p["k"])),
    Pair("klm", "KLMatching", lambda m, p: _detectors().KLMatching(m.model)),
    Pair(
        "vim",
        "ViM",
        lambda m, p: _detectors().ViM(m.features, d=p["dim"], w=m.fc.weight, b=m.fc.bias),
        differs="the peer's origin, covariance and eigh are float32, ours float64",
    ),
    Pair(
        "react",
        "ReAct",
        lambda m, p: _detectors().ReAct(
            m.pooled_map, m.fc_on_map, percentile=p["percentile"] / 100.0
        ),
    ),
    Pair(
        "ash",
        "ASH",
        lambda m, p: _detectors().ASH(
            m.feature_map,
            m.head_on_map,
            variant=f"ash-{p['variant']}",
            percentile=p["percentile"] / 100.0,
        ),
        differs=(
            "ours shapes the pooled feature (all the dump holds); the peer, as its docs and "
            "the paper apply it to a ResNet, shapes the last feature map before pooling"
        ),
    ),
    Pair(
        "ash",
        "ASH",
        lambda m, p: _detectors().ASH(
            m.pooled_map,
            m.fc_on_map,
            variant=f"ash-{p['variant']}",
            percentile=p["percentile"] / 100.0,
        ),
        counted=False,
        label="ash (peer on pooled)",
    ),
    Pair(
        "odin",
        "ODIN",
        lambda m, p: _detectors().ODIN(
            m.model, eps=p["eps"], temperature=p["temperature"], norm_std=m.std
        ),
        grad=True,
    ),
    Pair(
        "gradnorm",
        "GradNorm",
        lambda m, p: _detectors().GradNorm(
            m.model, param_filter=lambda name: name == "fc.weight", temperature=p["temperature"]
        ),
        grad=True,
    ),
    Pair(
        "mahalanobis_ens",
        "MultiMahalanobis",
        lambda m, p: _detectors().MultiMahalanobis(m.stages),
        counted=False,
        differs=(
            "not the same method: ours takes an input step per layer and weighs the four "
            "layer scores by a logistic regression of train vs FGSM images (Lee et al.); "
            "the peer sums the layer scores with equal weights and no input step"
        ),
    ),
)


# -- set-up: data and model ---------------------------------------------------


def load_config(path: Path, benchmark: str) -> tuple[dict, dict]:
    import yaml

    config = yaml.safe_load(path.read_text())
    return config["datasets"], config["benchmarks"][benchmark]


def curate_all(datasets: dict, names: list[str], data_dir: Path) -> dict[str, Path]:
    from ood.data.curate import curate

    dirs = {}
    for name in names:
        dirs[name] = data_dir / name
        curate(name, datasets[name], dirs[name])
    return dirs


def train_model(
    id_dir: Path, bench: dict, epochs: int, work: Path, threads: int
) -> tuple[Path, bool]:
    """Train (or reuse) the demo model; returns the checkpoint and whether it was trained now."""
    import torch

    from ood.data.manifest import manifest_sha256
    from ood.train.loop import TrainSettings, train

    settings = TrainSettings.from_dict({**bench.get("train", {}), "epochs": epochs})
    seed = int(bench["seeds"][0])
    method = next(iter(bench["methods"]))
    key = json.dumps(
        {
            "data": manifest_sha256(id_dir),
            "backbone": bench["backbone"],
            "method": method,
            "settings": asdict(settings),
            "seed": seed,
        },
        sort_keys=True,
    )
    model_dir = work / "model" / hashlib.sha256(key.encode()).hexdigest()[:12]
    checkpoint = model_dir / "model.pt"
    if checkpoint.exists():
        return checkpoint, False
    train(
        id_dir,
        checkpoint,
        model_dir / "train_log.csv",
        method=method,
        backbone=bench["backbone"],
        settings=settings,
        seed=seed,
        device="cpu",
        threads=threads,
    )
    # train() turns deterministic algorithms on for the process; timing runs without.
    torch.use_deterministic_algorithms(False)
    return checkpoint, True


# -- the two sides ----------------------------------------------------------------


Sets = list[tuple[str, str, str, Path]]  # (key, split, role, dataset dir)


class Ours:
    """Features once per (dataset, split) into Parquet dumps, then each scorer from the dumps."""

    def __init__(self, sets: Sets, checkpoint: Path, work: Path, threads: int) -> None:
        self.sets, self.checkpoint, self.work, self.threads = sets, checkpoint, work, threads
        self.dumps = {key: work / "features" / f"{key}.parquet" for key, *_ in sets}
        self.tests = [key for key, *_ in sets if key != "train"]

    def prepare(self) -> None:
        from ood.features import extract

        for key, split, role, data_dir in self.sets:
            extract(
                self.checkpoint,
                data_dir,
                split,
                self.dumps[key],
                role=role,
                batch_size=BATCH_SIZE,
                device="cpu",
                threads=self.threads,
            )

    def score(self, pair: Pair) -> dict[str, np.ndarray]:
        """One score_dumps call for all test sets, as the workflow's score rule runs it."""
        from ood.scores import get_scorer
        from ood.scores.run import score_dumps

        scorer = get_scorer(pair.ours)
        data_dirs = {key: data_dir for key, _, _, data_dir in self.sets}
        kwargs: dict[str, Any] = {}
        if set(scorer.needs) & {"head", "model"}:
            kwargs.update(checkpoint=self.checkpoint, device="cpu")
        if "model" in scorer.needs:
            # The peer's batch (the `ood score` default for gradient passes is 64).
            kwargs.update(train_data=data_dirs["train"], batch_size=BATCH_SIZE)
        images = "model" in scorer.needs
        tests = [
            (
                self.dumps[key],
                self.work / "scores" / pair.ours / f"{key}.parquet",
                data_dirs[key] if images else None,
            )
            for key in self.tests
        ]
        results = score_dumps(
            pair.ours,
            dict(scorer.params),
            tests,
            train_path=self.dumps["train"] if scorer.fits else None,
            threads=self.threads,
            **kwargs,
        )
        return {key: result.score for key, result in zip(self.tests, results, strict=True)}


class Peer:
    """pytorch-ood detectors over DataLoaders of the decoded, normalised images."""

    def __init__(self, sets: Sets, checkpoint: Path, threads: int) -> None:
        from ood.models.backbones import load_checkpoint

        self.sets, self.threads = sets, threads
        self.tests = [key for key, *_ in sets if key != "train"]
        model, self.meta = load_checkpoint(checkpoint)
        self.model = PeerModel(model, self.meta)
        self.loaders: dict[str, Any] = {}
        logging.getLogger("pytorch_ood").setLevel(logging.ERROR)  # "No device set..."

    def prepare(self) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from ood.data.manifest import load_images
        from ood.train.loop import to_model_input

        mean, std = self.meta["settings"]["mean"], self.meta["settings"]["std"]
        for key, split, role, data_dir in self.sets:
            images, labels, _ = load_images(data_dir, split=split)
            if role == "ood":
                labels = np.full(len(labels), -1)  # pytorch-ood's label for OOD samples
            dataset = TensorDataset(to_model_input(images, mean, std), torch.as_tensor(labels))
            self.loaders[key] = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False)

    def score(self, pair: Pair) -> dict[str, np.ndarray]:
        """Fit on the train loader (if the detector fits), predict batch by batch per test set."""
        import torch

        from ood.scores import get_scorer

        torch.set_num_threads(self.threads)
        detector = pair.build(self.model, dict(get_scorer(pair.ours).params))
        with contextlib.nullcontext() if pair.grad else torch.no_grad():
            if detector.requires_fit:
                detector.fit(self.loaders["train"])
            return {
                key: torch.cat([detector(x).detach().double() for x, _ in self.loaders[key]])
                .cpu()
                .numpy()
                for key in self.tests
            }


def measure(func: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    cpu = time.process_time()
    wall, result = timed(func)
    return wall, time.process_time() - cpu, result


def run_both(pairs: list[Pair], ours: Ours, peer: Peer, repeats: int) -> dict[str, Any]:
    """Each step on both sides back to back, `repeats` times, alternating which goes first.

    The machine may be shared: back-to-back runs see similar load, and the
    best of the repeats is the least disturbed. Steps: "data" (ours: the
    feature dumps; peer: decoding the images), then one per pair.
    """
    steps: list[tuple[str, Callable | None, Callable]] = [("data", ours.prepare, peer.prepare)]
    seen = set()
    for pair in pairs:
        # A scorer compared twice (ash) is scored by ours once.
        ours_step = None if pair.ours in seen else partial(ours.score, pair)
        seen.add(pair.ours)
        steps.append((pair.row, ours_step, partial(peer.score, pair)))

    times: dict[str, dict[str, list[tuple[float, float]]]] = {"ours": {}, "peer": {}}
    scores: dict[str, dict[str, Any]] = {"ours": {}, "peer": {}}
    for rep in range(repeats):
        for step, ours_step, peer_step in steps:
            sides = [("ours", ours_step), ("peer", peer_step)]
            for side, func in sides if rep % 2 == 0 else sides[::-1]:
                if func is None:
                    continue
                wall, cpu, result = measure(func)
                times[side].setdefault(step, []).append((wall, cpu))
                if result is not None:
                    scores[side][step] = result
            line = ", ".join(
                f"{side} {times[side][step][-1][0]:.2f} s" for side in times if step in times[side]
            )
            print(f"[{rep + 1}/{repeats}] {step}: {line}", flush=True)
    # Per step: the repeat with the least wall time, with its CPU time.
    best = {
        side: {step: min(runs) for step, runs in by_step.items()} for side, by_step in times.items()
    }
    return {"times": times, "best": best, "scores": scores}


def summarize(pairs: list[Pair], best: dict) -> dict[str, Any]:
    """Total wall and CPU seconds of the data step plus `pairs`, both sides, and the ratios."""
    steps = {
        "ours": ["data"] + [pair.row for pair in pairs if pair.row in best["ours"]],
        "peer": ["data"] + [pair.row for pair in pairs],
    }
    totals = {
        side: {
            "wall": sum(best[side][step][0] for step in names),
            "cpu": sum(best[side][step][1] for step in names),
        }
        for side, names in steps.items()
    }
    scorers = list(dict.fromkeys(pair.ours for pair in pairs))
    ratio = totals["peer"]["wall"] / totals["ours"]["wall"]
    return {
        "scorers": scorers,
        **totals,
        "ratio": ratio,
        "cpu_ratio": totals["peer"]["cpu"] / totals["ours"]["cpu"],
        "met": ratio >= TARGET_RATIO and len(scorers) >= TARGET_SCORERS,
    }


# -- comparison ---------------------------------------------------------------------


def compare(
    pairs: list[Pair], scores: dict, ood_sets: list[str], tol: float
) -> list[dict[str, Any]]:
    from ood.metrics import auroc

    rows = []
    first_row = {}
    for pair in pairs:
        first_row.setdefault(pair.ours, pair.row)
        ours_scores = scores["ours"][first_row[pair.ours]]
        peer_scores = scores["peer"][pair.row]
        per_set = {}
        for key in ood_sets:
            a = auroc(ours_scores["id_test"], ours_scores[key])
            # pytorch-ood: larger = more OOD; ours: larger = more ID.
            b = auroc(-peer_scores["id_test"], -peer_scores[key])
            per_set[key] = {"ours": a, "peer": b, "diff": abs(a - b)}
        max_diff = max(v["diff"] for v in per_set.values())
        rows.append(
            {
                "scorer": pair.row,
                "ours": pair.ours,
                "peer": pair.peer,
                "counted": pair.counted,
                "auroc": per_set,
                "max_abs_diff": max_diff,
                "flag": max_diff > tol,
                "why": pair.differs if max_diff > tol else "",
            }
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes results/benchmarks/scorers/table_cost[-quick].{json,md}.",
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "config" / "config.yaml", help="demo config"
    )
    parser.add_argument("--benchmark", default="demo", help="benchmark in the config (demo)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (config's)")
    parser.add_argument(
        "--scorers", default=None, help="comma-separated subset of our scorer names (all)"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads (all CPUs)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each step per side, best kept (1)"
    )
    parser.add_argument("--auroc-tol", type=float, default=1e-3, help="flag AUROC differences")
    parser.add_argument(
        "--work", type=Path, default=None, help="data, model, dumps (results/benchmarks/...)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 training epoch, without {', '.join(QUICK_SKIPS)} unless --scorers",
    )
    args = parser.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    if args.work is None:
        args.work = RESULTS / f"{result_name('table_cost', args.quick)}-work"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pytorch_ood  # noqa: F401 (loaded before the thread caps)
    import torch

    from ood.data.manifest import select_rows
    from ood.models.backbones import load_checkpoint
    from ood.scores import SCORERS

    limits = limit_threads(args.threads)  # noqa: F841 (the limits hold while it lives)
    torch.set_num_threads(args.threads)

    wanted = set(args.scorers.split(",")) if args.scorers else None
    paired = list(dict.fromkeys(pair.ours for pair in PAIRS))
    if wanted is not None and wanted - set(paired):
        unpaired = ", ".join(sorted(wanted - set(paired)))
        print(f"--scorers: no pytorch-ood pair for {unpaired}; known: {', '.join(paired)}")
        return 2
    unwanted = set(QUICK_SKIPS) if args.quick and wanted is None else set()
    pairs, skipped = [], []
    for pair in PAIRS:
        if (wanted is not None and pair.ours not in wanted) or pair.ours in unwanted:
            continue
        if pair.ours not in SCORERS:
            skipped.append(pair.ours)
            print(f"note: scorer {pair.ours!r} is not registered yet; skipped", flush=True)
            continue
        pairs.append(pair)
    if not pairs:
        print("no scorer to compare", file=sys.stderr)
        return 2

    datasets, bench = load_config(args.config, args.benchmark)
    ood_names = [name for group in bench["ood"].values() for name in group]
    epochs = args.epochs or (1 if args.quick else int(bench["train"]["epochs"]))

    setup: dict[str, float] = {}
    setup["curate"], dirs = timed(
        lambda: curate_all(datasets, [bench["id_dataset"], *ood_names], args.work / "data")
    )
    id_dir = dirs[bench["id_dataset"]]
    seconds, (checkpoint, trained) = timed(
        lambda: train_model(id_dir, bench, epochs, args.work, args.threads)
    )
    if trained:
        setup["train"] = seconds
    else:  # the cached run's own epoch times
        log = (checkpoint.parent / "train_log.csv").read_text().splitlines()
        column = log[0].split(",").index("seconds")
        setup["train (cached; epochs' seconds)"] = sum(
            float(line.split(",")[column]) for line in log[1:]
        )
    print(f"model: {checkpoint} ({'trained' if trained else 'reused'})", flush=True)

    # (key, split, role, dataset dir): the ID train split, the ID test split, each OOD set.
    sets = [("train", "train", "id", id_dir), ("id_test", "test", "id", id_dir)]
    sets += [(name, "test", "ood", dirs[name]) for name in ood_names]
    rows_per_set = {key: len(select_rows(d, split)) for key, split, _, d in sets}

    # Warm-up forward pass: one-time library start-up costs go to neither side.
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        model(torch.zeros(BATCH_SIZE, 3, 32, 32))
    del model

    ours = Ours(sets, checkpoint, args.work, args.threads)
    peer = Peer(sets, checkpoint, args.threads)
    measured = run_both(pairs, ours, peer, args.repeats)
    rows = compare(pairs, measured["scores"], ood_names, args.auroc_tol)

    best = measured["best"]
    counted = [pair for pair in pairs if pair.counted]
    summaries = {
        "all": summarize(counted, best),
        # Scorers reading only the dumps (no gradient passes of their own).
        "dump_only": summarize(
            [pair for pair in counted if "model" not in SCORERS[pair.ours].needs], best
        ),
    }
    for key, label in (("all", "all shared scorers"), ("dump_only", "dump-only scorers")):
        summary = summaries[key]
        print(
            f"{label} ({len(summary['scorers'])}, best of {args.repeats}): "
            f"ours {summary['ours']['wall']:.1f} s, peer {summary['peer']['wall']:.1f} s; "
            f"peer/ours = {summary['ratio']:.2f} wall, {summary['cpu_ratio']:.2f} CPU "
            f"(target >= {TARGET_RATIO} with >= {TARGET_SCORERS} scorers: "
            f"{'met' if summary['met'] else 'missed'})"
        )
    for row in rows:
        flag = f"  FLAG: {row['why'] or 'no stated reason'}" if row["flag"] else ""
        print(f"{row['scorer']:>22}: max |AUROC ours - peer| = {row['max_abs_diff']:.2e}{flag}")

    env = environment(args.threads)
    command = "python benchmarks/table_cost.py" + (" --quick" if args.quick else "")
    config_path = args.config.resolve()
    payload = {
        "benchmark": "table_cost",
        "command": command,
        "quick": args.quick,
        "config": {
            "config": str(config_path.relative_to(ROOT))
            if config_path.is_relative_to(ROOT)
            else str(config_path),
            "benchmark": args.benchmark,
            "epochs": epochs,
            "backbone": bench["backbone"],
            "rows": rows_per_set,
            "batch_size": BATCH_SIZE,
            "repeats": args.repeats,
            "auroc_tol": args.auroc_tol,
        },
        "setup_seconds": setup,
        "steps": {
            "ours": {step: {"wall": w, "cpu": c} for step, (w, c) in best["ours"].items()},
            "peer": {step: {"wall": w, "cpu": c} for step, (w, c) in best["peer"].items()},
        },
        "all_runs": measured["times"],
        "totals": summaries,
        "target": f">= {TARGET_RATIO} with >= {TARGET_SCORERS} scorers",
        "agreement": rows,
        "skipped": skipped,
        "environment": env,
    }
    markdown = render_markdown(payload, pairs, ood_names)
    json_path, md_path = write_result("table_cost", args.quick, payload, markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


def render_markdown(payload: dict, pairs: list[Pair], ood_names: list[str]) -> str:
    config, steps, totals = payload["config"], payload["steps"], payload["totals"]
    sizes = ", ".join(f"{key} {n}" for key, n in config["rows"].items())
    out = [
        "# Cost of a full demo table: one dump + scorers vs pytorch-ood detectors\n",
        f"`{payload['command']}`: benchmark {config['benchmark']!r} of {config['config']}, "
        f"{config['backbone']} trained {config['epochs']} epoch(s); images: {sizes}; "
        f"batch {config['batch_size']}, CPU, best of {config['repeats']}.\n",
        *(
            f"**{label} ({len(t['scorers'])}): ours {t['ours']['wall']:.1f} s, pytorch-ood "
            f"{t['peer']['wall']:.1f} s, ratio {t['ratio']:.2f}** (CPU time ratio "
            f"{t['cpu_ratio']:.2f}; target {payload['target']}: "
            f"{'met' if t['met'] else 'missed'}).\n"
            for label, t in (
                ("All shared scorers", totals["all"]),
                ("Dump-only scorers, no gradient passes", totals["dump_only"]),
            )
        ),
    ]

    def cell(side: str, step: str) -> str:
        if step not in steps[side]:
            return "-"
        return f"{steps[side][step]['wall']:.2f} ({steps[side][step]['cpu']:.1f})"

    cost_rows = [
        [
            "data",
            cell("ours", "data"),
            cell("peer", "data"),
            "ours: one forward pass per dataset into a dump; peer: decode the images once",
        ]
    ]
    for pair in pairs:
        note = "" if pair.counted else "not in the totals (not the same computation)"
        if pair.counted and pair.row not in steps["ours"]:
            note = "ours: scored once above"
        cost_rows.append(
            [f"{pair.row} / {pair.peer}", cell("ours", pair.row), cell("peer", pair.row), note]
        )
    out.append(md_table(["step", "ours s (CPU s)", "pytorch-ood s (CPU s)", ""], cost_rows))
    header = ["scorer / detector", *ood_names, "max abs diff", ""]
    agree_rows = []
    for row in payload["agreement"]:
        cells = [f"{v['ours']:.4f} / {v['peer']:.4f}" for v in row["auroc"].values()]
        agree_rows.append(
            [
                f"{row['scorer']} / {row['peer']}",
                *cells,
                f"{row['max_abs_diff']:.1e}",
                ("FLAG: " + (row["why"] or "no stated reason")) if row["flag"] else "",
            ]
        )
    out.append(
        "\nAUROC (ID test vs each OOD set), ours / pytorch-ood; flagged above "
        f"{config['auroc_tol']:g}:\n\n" + md_table(header, agree_rows)
    )
    if payload["skipped"]:
        out.append(f"\nSkipped (not registered): {', '.join(payload['skipped'])}.\n")
    setup = ", ".join(f"{k} {v:.1f} s" for k, v in payload["setup_seconds"].items())
    out.append(f"\nSet-up (not compared): {setup}.\n\n" + env_markdown(payload["environment"]))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
