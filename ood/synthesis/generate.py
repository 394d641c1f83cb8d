"""Decode sampled token embeddings with Stable Diffusion in shards; collect the outlier set.

Layout under one synthesis root, `results/outliers/<benchmark>/<name>/`:

    embeddings.pt                      class and sampled token vectors (`embeddings`)
    generated/<run>/class0003/0012.png the image of embedding 12 of class 3
    generated/<run>/class0003/0012.npy its denoised latent (float32, C x h x w)
    contact/class0003.png              a contact sheet of the class's images
    shards/1of4.csv                    one row per image of shard 1 of 4 (written last)
    set/manifest.csv                   the outlier set oe and oaml train on (`collect`)
    set/synthesis.csv                  per image: seed, embedding id, prompt, sampler settings
    overview.png                       a row of images per class (at most 16 classes; `collect`)

`<run>` is a digest of everything that decides the pixels (embeddings file,
pipeline folder, sampler settings), so a rerun with other settings never
reuses an older image. A shard works in fixed batches (class, first sample);
a batch whose files all exist is skipped, and every file is written to a
temporary name and renamed, so a killed shard restarts where it stopped and
ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ood.io import atomic_path, sha256_file, write_text_atomic
from ood.synthesis import check_positive, settings_from_dict
from ood.synthesis.pipeline import DEFAULT_TEMPLATE

log = logging.getLogger(__name__)

SHARD_COLUMNS = ("embedding_id", "class", "sample", "seed", "knn_distance", "image", "latent")
SYNTHESIS_COLUMNS = (
    "index",
    "embedding_id",
    "class",
    "sample",
    "seed",
    "prompt",
    "scheduler",
    "steps",
    "guidance",
    "resolution",
    "knn_distance",
    "image",
    "latent",
)
SEED_STRIDE = 1_000_003  # image seed = seed * SEED_STRIDE + embedding id: unique per image
THUMB = 128  # contact-sheet cell side at most, in pixels
OVERVIEW_CLASSES = 16  # rows of the set's overview sheet (a report item)
OVERVIEW_PER_CLASS = 8  # images per row


@dataclass
class SampleSettings:
    """Sampler settings; defaults are DreamOOD's (SD v1.4, PLMS 50 steps, guidance 7.5)."""

    template: str = DEFAULT_TEMPLATE
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    batch_size: int = 8
    seed: int = 0
    fp16: bool = False  # half precision (GPU only)
    attention_slicing: bool = False  # less GPU memory, a little slower

    def __post_init__(self) -> None:
        check_positive(self, ("steps", "resolution", "batch_size"))
        if self.resolution % 8:
            raise ValueError(
                f"synthesis setting resolution: {self.resolution} is not a multiple of 8"
            )

    @classmethod
    def from_dict(cls, values: dict) -> SampleSettings:
        return settings_from_dict(cls, values, "sampler")


def shard_classes(num_classes: int, index: int, count: int) -> range:
    """Classes of shard `index` (1-based) of `count`: contiguous, sizes differing by at most 1."""
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"shard {index} of {count}: need 1 <= index <= count")
    return range((index - 1) * num_classes // count, index * num_classes // count)


def image_seed(seed: int, embedding_id: int) -> int:
    return seed * SEED_STRIDE + embedding_id


def _run_digest(embeddings: Path, pipeline_dir: Path, settings: SampleSettings) -> str:
    """What decides the pixels: embeddings bytes, the pipeline's files, sampler settings."""
    files = sorted(
        (str(p.relative_to(pipeline_dir)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in pipeline_dir.rglob("*")
        if p.is_file()
    )
    payload = {
        "embeddings": sha256_file(embeddings),
        "pipeline": [str(pipeline_dir.resolve()), files],
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Denoised latents -> (B, H, W, 3) uint8 images, as the pipeline's own output does."""
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    array = pipe.image_processor.postprocess(pixels, output_type="np")
    return (array * 255).round().astype(np.uint8)


def _png_bytes(image: np.ndarray) -> bytes:
    from ood.data.manifest import PNG_COMPRESS_LEVEL

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _write_image(path: Path, image: np.ndarray, latent: np.ndarray) -> None:
    """Latent first, image last: an image's presence means both are complete."""
    with atomic_path(path.with_suffix(".npy")) as tmp, open(tmp, "wb") as handle:
        np.save(handle, latent)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_png_bytes(image))


def contact_sheet(paths: list[Path], out: Path) -> None:
    """One grid image of `paths` (rows of ceil(sqrt(n))), cells at most THUMB pixels."""
    cols = math.ceil(math.sqrt(len(paths)))
    grid_sheet([paths[i : i + cols] for i in range(0, len(paths), cols)], out)


def grid_sheet(grid: list[list[Path]], out: Path) -> None:
    """Write the images of `grid` (a list of rows) as one PNG, cells at most THUMB pixels.

    Rows may be shorter than the widest (left-aligned, white after them).
    """
    with Image.open(grid[0][0]) as first:
        side = min(THUMB, first.width)
    cols = max(len(row) for row in grid)
    sheet = Image.new("RGB", (cols * side, len(grid) * side), "white")
    for r, row in enumerate(grid):
        for c, path in enumerate(row):
            with Image.open(path) as image:
                cell = image.convert("RGB").resize((side, side), Image.BICUBIC)
            sheet.paste(cell, (c * side, r * side))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def overview_grid(rows: list[dict], root: Path) -> list[list[Path]]:
    """Image paths for the overview: a row per class, its first OVERVIEW_PER_CLASS samples.

    With more than OVERVIEW_CLASSES classes, that many are taken evenly spread
    (first and last included), so ImageNet's 1,000 classes still give one
    readable picture.
    """
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(int(row["class"]), []).append(row)
    classes = sorted(by_class)
    if len(classes) > OVERVIEW_CLASSES:
        picks = np.linspace(0, len(classes) - 1, OVERVIEW_CLASSES).round().astype(int)
        classes = [classes[i] for i in picks]
    return [
        [
            root / row["image"]
            for row in sorted(by_class[c], key=lambda row: int(row["sample"]))[:OVERVIEW_PER_CLASS]
        ]
        for c in classes
    ]


def _generate_batch(pipe, encoder, vectors: torch.Tensor, seeds: list[int], s: SampleSettings):
    """`(images (B, H, W, 3) uint8, latents (B, C, h, w) float32)` for one batch of vectors."""
    cond = encoder(vectors)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=encoder.empty(len(vectors)),
        num_inference_steps=s.steps,
        guidance_scale=s.guidance,
        height=s.resolution,
        width=s.resolution,
        generator=generators,
        output_type="latent",
    ).images
    return decode_latents(pipe, latents), latents.float().cpu().numpy()


def _load_embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`(vectors (C, keep, D), k-NN distances (C, keep))` of a `synth-embed` file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: embeddings file not found (run synth-embed)") from None
    except Exception as exc:  # pickle, zip or torch errors: one message naming the file
        raise ValueError(f"{path}: not an embeddings file written by synth-embed ({exc})") from None
    if not isinstance(data, dict) or {"vectors", "knn_distance"} - set(data):
        raise ValueError(f"{path}: not an embeddings file (needs vectors and knn_distance)")
    vectors, distances = data["vectors"], data["knn_distance"]
    if vectors.ndim != 3 or distances.shape != vectors.shape[:2]:
        raise ValueError(
            f"{path}: vectors {tuple(vectors.shape)} must be (classes, keep, D) and "
            f"knn_distance {tuple(distances.shape)} (classes, keep)"
        )
    return vectors, distances


def generate_shard(
    embeddings: str | os.PathLike,
    pipeline_dir: str | os.PathLike,
    root: str | os.PathLike,
    shard: tuple[int, int],
    out_csv: str | os.PathLike,
    settings: SampleSettings,
    *,
    device: str = "auto",
    threads: int | None = None,
) -> list[dict]:
    """Generate the images of shard `shard = (index, count)` under `root`; write `out_csv` last."""
    from ood.synthesis.pipeline import PromptEncoder, load_pipeline
    from ood.train.loop import select_device

    if threads:
        torch.set_num_threads(threads)
    # As in training: the same bytes from the same inputs, on one machine or a cluster.
    torch.use_deterministic_algorithms(True, warn_only=True)
    embeddings, pipeline_dir, root = Path(embeddings), Path(pipeline_dir), Path(root)
    vectors, distances = _load_embeddings(embeddings)
    num_classes, keep = vectors.shape[:2]
    classes = shard_classes(num_classes, *shard)
    run_dir = root / "generated" / _run_digest(embeddings, pipeline_dir, settings)
    batches = [
        (c, list(range(start, min(start + settings.batch_size, keep))))
        for c in classes
        for start in range(0, keep, settings.batch_size)
    ]

    def image_path(c: int, j: int) -> Path:
        return run_dir / f"class{c:04d}" / f"{j:04d}.png"

    todo = [(c, js) for c, js in batches if not all(image_path(c, j).is_file() for j in js)]
    done = sum(len(js) for _, js in batches) - sum(len(js) for _, js in todo)
    if todo:
        pipe = load_pipeline(
            pipeline_dir,
            select_device(device),
            fp16=settings.fp16,
            attention_slicing=settings.attention_slicing,
        )
        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, settings.template)
        dtype = pipe.text_encoder.dtype
        bar = tqdm(
            total=len(classes) * keep,
            initial=done,
            desc=f"shard {shard[0]}/{shard[1]}",
            unit="img",
            file=sys.stderr,
        )
        for c, js in todo:
            seeds = [image_seed(settings.seed, c * keep + j) for j in js]
            images, latents = _generate_batch(
                pipe, encoder, vectors[c, js].to(pipe.device, dtype), seeds, settings
            )
            for j, image, latent in zip(js, images, latents, strict=True):
                image_path(c, j).parent.mkdir(parents=True, exist_ok=True)
                _write_image(image_path(c, j), image, latent)
            bar.update(len(js))
        bar.close()
    rows = []
    for c in classes:
        paths = [image_path(c, j) for j in range(keep)]
        contact_sheet(paths, root / "contact" / f"class{c:04d}.png")
        for j, path in enumerate(paths):
            rows.append(
                {
                    "embedding_id": c * keep + j,
                    "class": c,
                    "sample": j,
                    "seed": image_seed(settings.seed, c * keep + j),
                    "knn_distance": f"{float(distances[c, j]):.6f}",
                    "image": path.relative_to(root).as_posix(),
                    "latent": path.with_suffix(".npy").relative_to(root).as_posix(),
                }
            )
    _write_csv(out_csv, SHARD_COLUMNS, rows)
    log.info(
        "%s: %d images of classes %s (%d generated now)",
        out_csv,
        len(rows),
        classes,
        len(rows) - done,
    )
    return rows


def _write_csv(path: str | os.PathLike, columns: tuple[str, ...], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _read_shard(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != SHARD_COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(SHARD_COLUMNS)}")
        return list(reader)


def collect(
    shard_csvs: list[str | os.PathLike],
    root: str | os.PathLike,
    id_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: SampleSettings,
    overview: str | os.PathLike | None = None,
    keep_size: bool = False,
) -> Path:
    """Join the shards into a curated dataset at the ID images' size; return its manifest.

    The images keep their class as label, all in the train split: an outlier
    set, which oe and oaml read whole. `synthesis.csv` beside the manifest
    gives each row's seed, embedding id, prompt and sampler settings; its
    `image`/`latent` are the full-resolution files under the synthesis root.
    `overview`, if given, is where to write `overview_grid`'s sheet (after the set).
    `keep_size` keeps the generated size, for models trained on streamed
    images (`images: stream`), which crop any size themselves.
    """
    from ood.data.manifest import load_image_size, write_dataset
    from ood.synthesis.pipeline import PLACEHOLDER

    root = Path(root)
    rows = sorted(
        (row for path in shard_csvs for row in _read_shard(Path(path))),
        key=lambda row: int(row["embedding_id"]),
    )
    ids = [int(row["embedding_id"]) for row in rows]
    if ids != list(range(len(ids))):
        raise ValueError(
            f"shards {[str(p) for p in shard_csvs]} do not cover embedding ids 0..N-1 "
            "exactly once (a shard missing or given twice?)"
        )
    # PIL sizes are (width, height); None keeps each image as generated.
    target = None if keep_size else load_image_size(id_dir)[::-1]

    def records():
        for row in rows:
            with Image.open(root / row["image"]) as image:
                image = image.convert("RGB")
                if target is not None and image.size != target:
                    image = image.resize(target, Image.BICUBIC)
                yield "train", int(row["class"]), np.asarray(image)

    prompt = settings.template.format(PLACEHOLDER)
    table = [
        {
            "index": i,
            **{k: row[k] for k in ("embedding_id", "class", "sample", "seed")},
            "prompt": prompt,
            "scheduler": "PLMS (PNDM, skip_prk_steps)",
            "steps": settings.steps,
            "guidance": settings.guidance,
            "resolution": settings.resolution,
            **{k: row[k] for k in ("knn_distance", "image", "latent")},
        }
        for i, row in enumerate(rows)
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SYNTHESIS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    info = json.dumps(
        {"source": "synthesis", "root": str(root), "settings": asdict(settings)}, indent=1
    )
    manifest = write_dataset(
        out_dir, _Sized(records, len(rows)), info=info, extra={"synthesis.csv": text.getvalue()}
    )
    if overview is not None:
        grid_sheet(overview_grid(rows, root), Path(overview))
    used = {Path(row["image"]).parts[1] for row in rows}  # generated/<run>/class.../....png
    stale = sorted(p.name for p in (root / "generated").iterdir() if p.name not in used)
    if stale:  # kept, as a return to older settings reuses them; but they take disk space
        log.info(
            "%s: older runs not in this set (from other settings; delete them to free space): %s",
            root / "generated",
            ", ".join(stale),
        )
    return manifest


class _Sized:
    """An iterable of known length (for the progress bar of `write_dataset`)."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.length
