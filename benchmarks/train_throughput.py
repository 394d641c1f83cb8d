"""Training throughput per method against the plain ce loop, same backbone, same run.

Each method runs the steps of the shared loop (ood.train.loop: `augment`
per view, the outlier batch for methods that use one, `objective.loss`,
backward, SGD step) on the same random 32x32 images, and reports:

- **images/s**: ID images per second of step time (a step's outliers and
  second views are the method's own cost);
- **x ce**: the method's images/s over ce's on the same backbone, measured in
  the same run (mood trains a BEiT: it is compared with ce on that BEiT, once
  per phase);
- **data share**: the fraction of step time spent assembling the batch
  (augmentation of every view and the outliers, moving them to the device):
  the data pipeline should not be the bottleneck.

Timings are best-of-`--repeats` medians over `--steps` steps after one
warm-up step. Writes results/benchmarks/training/train_throughput[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, env_markdown, environment, limit_threads, md_table, write_result

from ood.models.backbones import build_model
from ood.train import METHOD_TOKENS, METHODS, get_objective, objective_class
from ood.train.loop import TrainSettings, augment
from ood.train.objective import Batch, TrainContext

RESULTS = ROOT / "results" / "benchmarks" / "training"
CLASSES = 6
# Parameters a method cannot run without, for this benchmark's 6 classes.
REQUIRED = {"mos": {"groups": [[0, 1, 2], [3, 4, 5]]}}
TOKEN_BACKBONE = "beit_tiny_32"  # mood masks patch tokens: a BEiT, not the ResNet
TEACHER_BACKBONE = "vit_tiny_32"  # oaml's teacher (the paper's is a ViT-B/16)


def runs(backbone: str) -> list[tuple[str, str, str, str]]:
    """(row label, method, backbone, phase): every method on `backbone`, mood on a
    BEiT (each phase) with ce on that BEiT as its baseline."""
    rows = [(m, m, backbone, "train") for m in METHODS if m not in METHOD_TOKENS]
    rows.append((f"ce ({TOKEN_BACKBONE})", "ce", TOKEN_BACKBONE, "train"))
    rows += [(f"mood ({phase})", "mood", TOKEN_BACKBONE, phase) for phase in ("mim", "finetune")]
    return rows


def teacher_file(directory: Path) -> Path:
    torch.manual_seed(1)
    path = directory / "teacher.pt"
    torch.save(build_model(TEACHER_BACKBONE, CLASSES).state_dict(), path)
    return path


def step_times(
    method, backbone, batch, steps, phase="train", teacher=None
) -> tuple[list[float], list[float]]:
    """(data seconds, total seconds) of each of `steps` training steps."""
    torch.manual_seed(0)
    settings = TrainSettings(batch_size=batch, crop_padding=4, hflip=True)
    objective = get_objective(method, REQUIRED.get(method, {}))
    model = build_model(backbone, objective.num_outputs(CLASSES))
    context = TrainContext.uniform(CLASSES)
    if objective.needs_teacher:
        context.teacher, context.teacher_backbone = str(teacher), TEACHER_BACKBONE
    extra = objective.setup(model, context)
    params = list(model.parameters()) + (list(extra.parameters()) if extra else [])
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    images = torch.randn(4 * batch, 3, 32, 32)
    labels = torch.arange(4 * batch) % CLASSES
    outliers = torch.randn(8 * batch, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    model.train()
    data, total = [], []
    for step in range(steps + 1):  # step 0 warms up
        start = time.perf_counter()
        idx = torch.randperm(len(images), generator=gen)[:batch]
        views = [augment(images[idx], settings, gen) for _ in range(objective.views)]
        out = None
        if objective.outliers:
            pick = torch.randperm(len(outliers), generator=gen)[: 2 * batch]
            out = augment(outliers[pick], settings, gen)
        prepared = Batch(views, labels[idx], out, phase=phase, gen=gen)
        assembled = time.perf_counter()
        loss, _ = objective.loss(model, prepared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = time.perf_counter()
        if step:
            data.append(assembled - start)
            total.append(done - start)
    return data, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18_32_pool")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats = 16, 3, 1
    threads = args.threads or torch.get_num_threads()
    pools = limit_threads(threads)  # noqa: F841 (keeps the thread cap alive)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_file(Path(tmp))
        for label, method, backbone, phase in runs(args.backbone):
            best = None
            for _ in range(args.repeats):
                data, total = step_times(method, backbone, args.batch, args.steps, phase, teacher)
                run = (statistics.median(total), statistics.median(data))
                best = run if best is None or run[0] < best[0] else best
            step, data_s = best
            results[label] = {
                "method": method,
                "backbone": backbone,
                "phase": phase,
                "step_s": step,
                "data_s": data_s,
                "images_per_s": args.batch / step,
                "data_share": data_s / step,
                "views": objective_class(method).views,
                "outliers": objective_class(method).outliers,
            }
            print(f"{label}: {args.batch / step:.1f} images/s, data {100 * data_s / step:.1f}%")
    baseline = {r["backbone"]: r["images_per_s"] for r in results.values() if r["method"] == "ce"}
    for r in results.values():
        r["x_ce"] = r["images_per_s"] / baseline[r["backbone"]]
    rows = [
        [
            label,
            r["backbone"],
            f"{r['images_per_s']:.1f}",
            f"{r['x_ce']:.2f}",
            f"{100 * r['data_share']:.1f}%",
            r["views"],
            "yes" if r["outliers"] else "-",
        ]
        for label, r in results.items()
    ]
    env = environment(threads)
    markdown = (
        f"# Training throughput ({args.backbone}, batch {args.batch}, CPU)\n\n"
        f"Median step over {args.steps} steps, best of {args.repeats}.\n\n"
        + md_table(
            ["method", "backbone", "images/s", "x ce", "data share", "views", "outliers"], rows
        )
        + "\n"
        + env_markdown(env)
    )
    payload = {"backbone": args.backbone, "batch": args.batch, "results": results, "env": env}
    json_path, md_path = write_result("train_throughput", args.quick, payload, markdown, RESULTS)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    worst = max(r["data_share"] for r in results.values())
    if worst > 0.5:
        print(f"the data pipeline takes {100 * worst:.0f}% of a step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
