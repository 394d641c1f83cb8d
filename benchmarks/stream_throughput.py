"""Streamed-image throughput: our per-batch views against a torchvision DataLoader, same work.

A curated dataset of JPEGs of ImageNet-like sizes (sides 250-500, quality
90) is written once; both sides then decode every image and make a 224x224
view of it, on CPU with `--threads` workers:

- **ours**: `ood.data.views.StreamedImages.batch` (thread pool; one PIL
  resize of the crop box), batches of `--batch`, train views from a seeded
  generator, then eval views;
- **torchvision**: `DataLoader(num_workers=threads)` over the same files
  with `RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor`, then
  `Resize(256) + CenterCrop(224) + PILToTensor` (the usual ImageNet
  pipeline).

Reports images/s of both and the ratio ours / torchvision (target >= 0.8:
no slower than the standard loader by more than a fifth). Best of
`--repeats` runs each, alternating. Writes
results/benchmarks/data/stream_throughput[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, env_markdown, environment, limit_threads, md_table, timed, write_result
from PIL import Image

from ood.data.manifest import read_manifest, row_file, write_dataset
from ood.data.views import StreamedImages

RESULTS = ROOT / "results" / "benchmarks" / "data"
SIZE = 224


def write_jpegs(work: Path, count: int) -> Path:
    """A curated dataset of `count` smooth random JPEGs of random sizes (2 classes)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(250, 501, 2))
        small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        path = work / "src" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        files.append(("train", i % 2, path))
    return write_dataset(work / "set", files).parent


def ours(dataset: Path, batch: int, threads: int) -> int:
    images = StreamedImages(dataset, "train", SIZE, threads)
    gen = torch.Generator().manual_seed(0)
    made = 0
    for start in range(0, len(images), batch):
        made += len(images.batch(range(start, min(start + batch, len(images))), gen))
    for start in range(0, len(images), batch):
        made += len(images[start : start + batch])
    return made


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def torchvision_loader(dataset: Path, batch: int, threads: int) -> int:
    from torchvision import transforms

    paths = [row_file(dataset, row) for row in read_manifest(dataset)]
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(SIZE),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    evaluate = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(SIZE), transforms.PILToTensor()]
    )
    made = 0
    for transform in (train, evaluate):
        loader = torch.utils.data.DataLoader(
            _Files(paths, transform), batch_size=batch, num_workers=threads
        )
        made += sum(len(x) for x in loader)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--quick", action="store_true", help="64 images, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 64, 1
    threads = args.threads or torch.get_num_threads()
    pools = limit_threads(threads)  # noqa: F841 (keeps the thread cap alive)
    views = 2 * args.images  # a train view and an eval view of each image

    best = {"ours": float("inf"), "torchvision": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_jpegs(Path(tmp), args.images)
        for _ in range(args.repeats):
            for side, run in (("ours", ours), ("torchvision", torchvision_loader)):
                seconds, made = timed(lambda run=run: run(dataset, args.batch, threads))
                assert made == views, (side, made)
                best[side] = min(best[side], seconds)
            print(f"ours {best['ours']:.2f} s, torchvision {best['torchvision']:.2f} s (best)")
    rate = {side: views / seconds for side, seconds in best.items()}
    ratio = rate["ours"] / rate["torchvision"]
    env = environment(threads)
    markdown = (
        "# Streamed-image throughput (CPU)\n\n"
        f"{args.images} JPEGs (sides 250-500), a 224x224 train view and eval view of each, "
        f"batches of {args.batch}, {threads} worker(s); best of {args.repeats}.\n\n"
        + md_table(
            ["side", "seconds", "views/s"],
            [[s, f"{best[s]:.2f}", f"{rate[s]:.1f}"] for s in ("ours", "torchvision")],
        )
        + f"\nRatio ours / torchvision: {ratio:.2f} (target >= 0.8).\n\n"
        + env_markdown(env)
    )
    payload = {
        "images": args.images,
        "batch": args.batch,
        "seconds": best,
        "views_per_s": rate,
        "ratio": ratio,
        "env": env,
    }
    json_path, md_path = write_result("stream_throughput", args.quick, payload, markdown, RESULTS)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    if ratio < 0.8 and not args.quick:
        print(f"ratio {ratio:.2f} is under the 0.8 target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
