"""Synthesis throughput: our shard generation against a direct diffusers call, same settings.

Both sides load the same tiny random Stable Diffusion pipeline from disk
(`ood synth-pipeline`) and make the same number of images with the same
sampler (PLMS, `--steps` steps, guidance 7.5, `--resolution` pixels, batches of
`--batch`, one seeded generator per image), on CPU:

- **ours**: `ood.synthesis.generate.generate_shard` from an embeddings file:
  class-token replacement in the text encoder, sampling to latents, decoding,
  writing each PNG and latent atomically, the contact sheets and the shard CSV;
- **direct**: `StableDiffusionPipeline.__call__` on a plain text prompt with
  numpy output, nothing written.

Reports images/s of both and our overhead (direct images/s over ours, minus 1;
target < 10%). Best of `--repeats` runs each, alternating. The tiny UNet is
cheap, so fixed costs weigh more here than with SD v1.4 on a GPU: the
overhead measured here is an upper bound. Writes
results/benchmarks/synthesis/synthesis_throughput[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _common import ROOT, env_markdown, environment, limit_threads, md_table, timed, write_result

from ood.synthesis.generate import SampleSettings, generate_shard
from ood.synthesis.pipeline import write_tiny_pipeline

RESULTS = ROOT / "results" / "benchmarks" / "synthesis"
TOKEN_WIDTH = 32  # the tiny text encoder's


def fake_embeddings(path: Path, classes: int, per_class: int) -> None:
    """An embeddings file as `ood synth-embed` writes it, with random token vectors."""
    gen = torch.Generator().manual_seed(0)
    torch.save(
        {
            "vectors": torch.randn(classes, per_class, TOKEN_WIDTH, generator=gen) * 0.1,
            "knn_distance": torch.ones(classes, per_class),
            "num_classes": classes,
        },
        path,
    )


def ours(work: Path, pipeline: Path, embeddings: Path, settings: SampleSettings) -> int:
    root = work / "ours"
    shutil.rmtree(root, ignore_errors=True)
    rows = generate_shard(
        embeddings, pipeline, root, (1, 1), root / "shards/1of1.csv", settings, device="cpu"
    )
    return len(rows)


def direct(pipeline: Path, images: int, settings: SampleSettings) -> int:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    made = 0
    while made < images:
        batch = min(settings.batch_size, images - made)
        out = pipe(
            prompt=["a high-quality photo of a cat"] * batch,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            height=settings.resolution,
            width=settings.resolution,
            generator=[torch.Generator().manual_seed(made + i) for i in range(batch)],
            output_type="np",
        )
        made += len(out.images)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=16, help="images per class")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="PLMS steps (DreamOOD: 50)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--quick", action="store_true", help="2 classes x 4 images, 5 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.per_class, args.steps, args.repeats = 2, 4, 5, 1
    threads = args.threads or torch.get_num_threads()
    pools = limit_threads(threads)  # noqa: F841 (keeps the thread cap alive)
    settings = SampleSettings(steps=args.steps, resolution=args.resolution, batch_size=args.batch)
    images = args.classes * args.per_class

    best = {"ours": float("inf"), "direct": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline = write_tiny_pipeline(work / "tiny_sd", resolution=args.resolution)
        embeddings = work / "embeddings.pt"
        fake_embeddings(embeddings, args.classes, args.per_class)
        for _ in range(args.repeats):
            seconds, made = timed(lambda: ours(work, pipeline, embeddings, settings))
            assert made == images
            best["ours"] = min(best["ours"], seconds)
            seconds, made = timed(lambda: direct(pipeline, images, settings))
            assert made == images
            best["direct"] = min(best["direct"], seconds)
            print(f"ours {best['ours']:.2f} s, direct {best['direct']:.2f} s (best so far)")
    rate = {side: images / seconds for side, seconds in best.items()}
    overhead = rate["direct"] / rate["ours"] - 1
    env = environment(threads)
    markdown = (
        f"# Synthesis throughput (tiny pipeline, CPU)\n\n"
        f"{images} images ({args.classes} classes x {args.per_class}), {args.steps} PLMS steps, "
        f"guidance 7.5, {args.resolution}x{args.resolution}, batches of {args.batch}; "
        f"best of {args.repeats}.\n\n"
        + md_table(
            ["side", "seconds", "images/s"],
            [[side, f"{best[side]:.2f}", f"{rate[side]:.2f}"] for side in ("ours", "direct")],
        )
        + f"\nOur overhead: {100 * overhead:.1f}% (target < 10%).\n\n"
        + env_markdown(env)
    )
    payload = {
        "images": images,
        "steps": args.steps,
        "resolution": args.resolution,
        "batch": args.batch,
        "seconds": best,
        "images_per_s": rate,
        "overhead": overhead,
        "env": env,
    }
    json_path, md_path = write_result(
        "synthesis_throughput", args.quick, payload, markdown, RESULTS
    )
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    if overhead >= 0.10 and not args.quick:
        print(f"overhead {100 * overhead:.1f}% is over the 10% target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
