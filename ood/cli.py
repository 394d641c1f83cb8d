"""`ood`: the entry point every workflow rule calls, one subcommand per stage.

Heavy modules are imported inside each subcommand, so `ood score` and
`ood tables` start without loading torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import ood

log = logging.getLogger("ood")


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text[:80]!r}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text[:80]!r}")
    return value


def _dataset_dir(manifest: str) -> Path:
    return Path(manifest).parent


def cmd_curate(args: argparse.Namespace) -> None:
    from ood.data.curate import curate

    inputs = {role: Path(path) for role, path in args.inputs.items()}
    curate(args.name, args.spec, args.out, inputs=inputs)


def cmd_fetch(args: argparse.Namespace) -> None:
    from ood.data.download import fetch

    fetch(args.name, args.spec, Path(args.out), Path(args.cache))


def cmd_audit(args: argparse.Namespace) -> None:
    from ood.data.dedup import audit

    result = audit(
        _dataset_dir(args.id_manifest),
        _dataset_dir(args.ood_manifest),
        Path(args.out),
        threshold=args.threshold,
        size=args.size,
        drop=args.drop,
    )
    log.info("%s: %d of %d flagged", args.out, result.n_flagged, result.n_ood)


def cmd_train(args: argparse.Namespace) -> None:
    from ood.train.loop import TrainSettings, train

    meta = train(
        _dataset_dir(args.manifest),
        args.out,
        args.log_csv,
        method=args.method,
        backbone=args.backbone,
        settings=TrainSettings.from_dict(args.settings),
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        resume_dir=args.resume_dir,
        outliers_dir=_dataset_dir(args.outliers) if args.outliers else None,
        teacher=args.teacher,
        teacher_backbone=args.teacher_backbone,
    )
    log.info("saved %s (train accuracy %s)", args.out, meta["final_train_accuracy"])


def cmd_synth_pipeline(args: argparse.Namespace) -> None:
    from ood.synthesis.pipeline import write_tiny_pipeline

    write_tiny_pipeline(args.out, seed=args.seed, resolution=args.resolution)
    log.info("wrote a tiny random Stable Diffusion pipeline to %s", args.out)


def cmd_synth_embed(args: argparse.Namespace) -> None:
    from ood.synthesis.embeddings import EmbedSettings, embed

    embed(
        _dataset_dir(args.manifest),
        args.pipeline,
        args.out,
        EmbedSettings.from_dict(args.settings),
        device=args.device,
        threads=args.threads,
    )


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("of")
    if not (sep and index.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"expected INDEXofCOUNT like 1of4, got {text!r}")
    return int(index), int(count)


def cmd_synth_generate(args: argparse.Namespace) -> None:
    from ood.synthesis.generate import SampleSettings, generate_shard

    generate_shard(
        args.embeddings,
        args.pipeline,
        args.root,
        args.shard,
        args.out,
        SampleSettings.from_dict(args.settings),
        device=args.device,
        threads=args.threads,
    )


def cmd_synth_collect(args: argparse.Namespace) -> None:
    from ood.synthesis.generate import SampleSettings, collect

    manifest = collect(
        args.shards,
        args.root,
        _dataset_dir(args.id_manifest),
        _dataset_dir(args.out),
        SampleSettings.from_dict(args.settings),
        overview=args.overview,
        keep_size=args.keep_size,
    )
    log.info("wrote the outlier set %s", manifest)


def cmd_features(args: argparse.Namespace) -> None:
    from ood.features import extract

    dump = extract(
        args.checkpoint,
        _dataset_dir(args.manifest),
        args.split,
        args.out,
        role=args.role,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        context=args.context,
        views=args.views,
    )
    log.info("wrote %s: %d rows, feature dim %d", args.out, len(dump), dump.feature.shape[1])


def cmd_score(args: argparse.Namespace) -> None:
    from ood.scores.run import score_dumps

    if len(args.out) != len(args.test):
        raise ValueError(f"--out names {len(args.out)} file(s) for {len(args.test)} --test dump(s)")
    manifests = args.test_manifest or [None] * len(args.test)
    if len(manifests) != len(args.test):
        raise ValueError(
            f"--test-manifest names {len(manifests)} file(s) for {len(args.test)} --test dump(s)"
        )
    data = [_dataset_dir(m) if m else None for m in manifests]
    results = score_dumps(
        args.scorer,
        args.params,
        list(zip(args.test, args.out, data, strict=True)),
        train_path=args.train,
        threads=args.threads,
        variant=args.variant,
        checkpoint=args.checkpoint,
        train_data=_dataset_dir(args.train_manifest) if args.train_manifest else None,
        device=args.device,
        batch_size=args.batch_size,
    )
    for out, scores in zip(args.out, results, strict=True):
        log.info("wrote %s: %d scores", out, len(scores.score))


def cmd_tables(args: argparse.Namespace) -> None:
    from ood.tables import load_benchmarks, write_tables

    benchmarks = load_benchmarks(args.benchmarks)
    table = write_tables(args.scores, args.features, benchmarks, args.csv, Path(args.csv).parent)
    log.info("wrote %s: %d rows", args.csv, len(table))


def cmd_concat_tables(args: argparse.Namespace) -> None:
    from ood.tables import concat_tables

    table = concat_tables(args.tables, args.out)
    log.info("wrote %s: %d rows from %d tables", args.out, len(table), len(args.tables))


def cmd_methods(args: argparse.Namespace) -> None:
    from ood.train.methods import describe, describe_markdown

    print(describe_markdown(), end="") if args.markdown else print("\n".join(describe()))


def cmd_scorers(args: argparse.Namespace) -> None:
    from ood.scores import describe, describe_markdown

    print(describe_markdown(), end="") if args.markdown else print("\n".join(describe()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ood",
        description="oodbench stages. The Snakemake workflow calls these; run them by hand "
        "to redo one step. Scores follow one convention: higher = more in-distribution.",
    )
    parser.add_argument("--version", action="version", version=f"oodbench {ood.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def add_compute(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    p = add("curate", cmd_curate, "build a dataset under OUT with images and manifest.csv")
    p.add_argument("--name", required=True, help="dataset name (for messages)")
    p.add_argument(
        "--spec", required=True, type=_json_arg, help='JSON: {"source": ..., "params": {...}}'
    )
    p.add_argument(
        "--inputs", type=_json_arg, default={}, help='JSON: {"<role>": "<download dir>"}'
    )
    p.add_argument("--out", required=True, help="dataset directory to create")

    p = add("fetch", cmd_fetch, "download (or take from disk), verify and unpack one source")
    p.add_argument("--name", required=True, help="download name (for messages)")
    p.add_argument(
        "--spec", required=True, type=_json_arg, help='JSON: {"url"|"path", "sha256", "format"}'
    )
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--cache", required=True, help="where verified downloads are kept")

    p = add("audit", cmd_audit, "near-duplicate audit of an OOD set against the ID train set")
    p.add_argument("--id-manifest", required=True, help="manifest.csv of the ID dataset")
    p.add_argument("--ood-manifest", required=True, help="manifest.csv of the OOD dataset")
    p.add_argument("--out", required=True, help="report directory to create")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity to flag")
    p.add_argument("--size", type=int, default=16, help="side of the grayscale embedding")
    p.add_argument("--drop", action="store_true", help="also write a de-duplicated copy")

    p = add("train", cmd_train, "train one method on a dataset's train split")
    p.add_argument("--manifest", required=True, help="manifest.csv of the ID dataset")
    p.add_argument("--method", required=True, help="training objective, e.g. ce")
    p.add_argument("--backbone", required=True, help="backbone name, e.g. resnet18_32")
    p.add_argument("--settings", type=_json_arg, default={}, help="JSON training settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint to write (model.pt)")
    p.add_argument("--log-csv", required=True, help="per-epoch loss/accuracy CSV to write")
    p.add_argument("--resume-dir", default=None, help="where epoch checkpoints are kept")
    p.add_argument(
        "--outliers", default=None, help="manifest.csv of the auxiliary outlier set (oe, ...)"
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="checkpoint to distil from (oaml): an `ood train` model.pt, or a state dict "
        "with --teacher-backbone",
    )
    p.add_argument(
        "--teacher-backbone",
        default=None,
        help="timm backbone name of a bare --teacher state dict (e.g. vit_b16_224)",
    )
    add_compute(p)

    p = add(
        "synth-pipeline",
        cmd_synth_pipeline,
        "write a tiny random Stable Diffusion pipeline (tests, demo: images mean nothing)",
    )
    p.add_argument("--out", required=True, help="folder to create (diffusers format)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--resolution", type=int, default=32, help="the UNet's native image side")

    p = add(
        "synth-embed",
        cmd_synth_embed,
        "learn class token embeddings on the ID train split; sample boundary outlier embeddings",
    )
    p.add_argument("--manifest", required=True, help="manifest.csv of the ID dataset")
    p.add_argument("--pipeline", required=True, help="Stable Diffusion folder (diffusers format)")
    p.add_argument("--out", required=True, help="embeddings file to write (.pt)")
    p.add_argument(
        "--settings", type=_json_arg, default={}, help="JSON: encoder, epochs, sigma, k, keep, ..."
    )
    add_compute(p)

    p = add(
        "synth-generate",
        cmd_synth_generate,
        "decode one shard's outlier embeddings into images and latents (resumable)",
    )
    p.add_argument("--embeddings", required=True, help="file written by synth-embed")
    p.add_argument("--pipeline", required=True, help="Stable Diffusion folder (diffusers format)")
    p.add_argument("--root", required=True, help="synthesis folder: generated/ and contact/")
    p.add_argument("--shard", required=True, type=_shard, help="INDEXofCOUNT, e.g. 1of4")
    p.add_argument("--out", required=True, help="the shard's CSV, written last")
    p.add_argument(
        "--settings",
        type=_json_arg,
        default={},
        help="JSON: template, steps, guidance, resolution, batch_size, seed, fp16, "
        "attention_slicing",
    )
    add_compute(p)

    p = add("synth-collect", cmd_synth_collect, "join generated shards into an outlier set")
    p.add_argument("--shards", required=True, nargs="+", help="shard CSVs")
    p.add_argument("--root", required=True, help="synthesis folder the shard CSVs refer to")
    p.add_argument("--id-manifest", required=True, help="manifest.csv of the ID dataset (size)")
    p.add_argument("--out", required=True, help="manifest.csv of the outlier set to create")
    p.add_argument("--settings", type=_json_arg, default={}, help="JSON sampler settings")
    p.add_argument(
        "--overview", help="PNG to write: a row of images per class (at most 16 classes)"
    )
    p.add_argument(
        "--keep-size",
        action="store_true",
        help="keep the generated size (for images: stream) instead of the ID images' size",
    )

    p = add("features", cmd_features, "dump logits and penultimate features to Parquet")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help="manifest.csv of the dataset")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--role", required=True, choices=["id", "ood"], help="ood writes label -1")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--context", type=_json_arg, default={}, help="JSON added to file metadata")
    p.add_argument(
        "--views", action="store_true", help="also write the multi-scale views column (csd)"
    )
    add_compute(p)

    p = add(
        "score", cmd_score, "score feature dumps with one scorer, fitted once on the train dump"
    )
    p.add_argument("--scorer", required=True, help="registry name (see `ood scorers`)")
    p.add_argument("--params", type=_json_arg, default={}, help="JSON scorer parameters")
    p.add_argument("--test", required=True, nargs="+", help="feature dump(s) to score")
    p.add_argument("--train", default=None, help="ID train feature dump (scorers that fit)")
    p.add_argument("--out", required=True, nargs="+", help="score dump to write per --test")
    p.add_argument("--variant", default=None, help="variant id of a parameter grid (tables)")
    p.add_argument(
        "--checkpoint", default=None, help="model.pt (scorers needing the head or the model)"
    )
    p.add_argument(
        "--test-manifest",
        nargs="+",
        default=None,
        help="manifest.csv of each --test dump's dataset (needs=model)",
    )
    p.add_argument(
        "--train-manifest", default=None, help="manifest.csv of the ID dataset (needs=model)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per gradient pass")
    add_compute(p)

    p = add(
        "tables",
        cmd_tables,
        "compute metrics: a long CSV and a readable NAME.md per benchmark beside it",
    )
    p.add_argument("--benchmarks", required=True, help='JSON: {name: {"id_dataset", "ood"}}')
    p.add_argument("--csv", required=True, help="long table to write (e.g. NAME.csv)")
    p.add_argument("--features", nargs="+", required=True, help="ID test feature dumps")
    p.add_argument("--scores", nargs="+", required=True, help="score dumps (ID and OOD)")

    p = add("concat-tables", cmd_concat_tables, "join per-benchmark long tables into all.csv")
    p.add_argument("tables", nargs="+", help="long tables written by `ood tables`")
    p.add_argument("--out", required=True, help="table to write (all.csv)")

    p = add("methods", cmd_methods, "list the training methods: objective, backbone, scorers")
    p.epilog = "Set a method's parameters in the config: methods.<m>.train.method_params."
    p.add_argument("--markdown", action="store_true", help="print the README's table")

    p = add("scorers", cmd_scorers, "list the scorers, what they need and their parameters")
    p.epilog = (
        "needs: logits / feature = dump columns; views = multi-scale views column (csd); "
        "head = classifier weights read from the checkpoint; groups = a group-softmax model "
        "(mos); model = gradient passes through the model on the images. fits = needs the "
        "ID train dump. A list in a config parameter is a grid (one variant per value)."
    )
    p.add_argument("--markdown", action="store_true", help="print the README's table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if os.environ.get("OOD_DEBUG"):
            raise
        print(f"ood {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
