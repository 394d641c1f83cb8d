"""The training loop every method shares: data, optimiser, schedule, resume, log.

Determinism: the model is initialised from `seed`, and each epoch's shuffle
and augmentation draw from a generator seeded by (seed, epoch). So a run
resumed from its epoch checkpoint replays exactly what an uninterrupted run
would have done, and the same seed gives the same weights on CPU (with the
same thread count).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ood.data.manifest import load_images, manifest_sha256
from ood.data.views import DRAWS, StreamedImages, check_images_mode
from ood.io import atomic_path, sha256_file, write_text_atomic
from ood.models.backbones import build_model, save_checkpoint
from ood.models.specs import BACKBONES
from ood.train import get_objective
from ood.train.objective import Batch, TrainContext

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "loss", "accuracy", "lr", "seconds")
PREFETCH = 2  # streamed batches decoded ahead of the training step


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    crop_padding: int = 4  # random crop after zero-padding by this many pixels; 0 = off
    hflip: bool = False  # digits and text are not mirror-symmetric
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    pretrained: str | None = None  # path to backbone weights on disk; None = random init
    method_params: dict = field(default_factory=dict)
    # Outliers per step, for methods that train on them; None = 2 x batch_size (OE's ratio).
    outlier_batch_size: int | None = None
    # On a GPU only: float16 autocast with loss scaling, and channels-last memory layout.
    amp: bool = True
    channels_last: bool = True
    # sgd (momentum, nesterov as above) or adamw (transformer fine-tuning, e.g. BEiT).
    optimizer: str = "sgd"
    # adamw only: per-block lr decay from the head down (BEiT's layer decay), via timm; 1 = off.
    layer_decay: float = 1.0
    warmup_epochs: int = 0  # linear warm-up before the cosine schedule
    # memory: decode the split once (one image size; crop_padding/hflip augment, smaller
    # images upsampled). stream: decode per batch, any sizes, random-resized crops to the
    # backbone's size (+ hflip) for training, central crops for features (ood.data.views).
    images: str = "memory"

    def __post_init__(self) -> None:
        check_images_mode(self.images, "training setting")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"training setting optimizer: {self.optimizer!r}; known: sgd, adamw")
        if self.layer_decay != 1.0 and self.optimizer != "adamw":
            raise ValueError("training setting layer_decay needs optimizer: adamw")

    @classmethod
    def from_dict(cls, values: dict) -> TrainSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def select_device(requested: str) -> torch.device:
    """cpu, or a CUDA device: with several visible, the first one no other job holds."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    from ood.gpus import claim_device

    index = claim_device(count)
    torch.cuda.set_device(index)  # for code that uses the current device
    return torch.device("cuda", index)


def to_model_input(
    images: np.ndarray | torch.Tensor, mean, std, size: int | None = None
) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW; upsampled to `size` x `size` if given."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return resize_input((x - mean_t) / std_t, size)


def resize_input(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear upsampling of a (N, C, H, W) batch to size x size (None: unchanged)."""
    if size is None or x.shape[-2:] == (size, size):
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def input_size_for(shape: tuple[int, ...], size: int, where: str) -> int | None:
    """The size to upsample images of `shape` (N, H, W, 3) to for a backbone taking
    size x size: None when they fit already. Smaller square images are upsampled
    per batch (as MOOD feeds 32x32 CIFAR to a 224x224 BEiT); larger or
    non-square ones are an error: curate them at the backbone's size."""
    height, width = shape[1], shape[2]
    if (height, width) == (size, size):
        return None
    if height == width and height < size:
        return size
    raise ValueError(
        f"{where}: images are {height}x{width}, the backbone takes {size}x{size}; "
        "only smaller square images are upsampled"
    )


def augment(batch: torch.Tensor, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (with zero padding) and optional flip, drawn from `gen`."""
    n, _, h, w = batch.shape
    pad = settings.crop_padding
    if pad > 0:
        padded = nn.functional.pad(batch, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
        batch = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
        )
    if settings.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
    return batch


def _outlier_inputs(
    objective,
    outliers_dir,
    size: int,
    settings: TrainSettings,
    upsample: int | None = None,
    threads: int | None = None,
):
    """The outlier images as model input, for methods that train on them; else None."""
    if not objective.outliers:
        if outliers_dir is not None:
            raise ValueError(f"method {objective.name!r} takes no outlier set (got {outliers_dir})")
        return None
    if outliers_dir is None:
        raise ValueError(
            f"method {objective.name!r} trains on an auxiliary outlier set; give one "
            "(config: methods.<method>.outliers)"
        )
    if settings.images == "stream":
        return StreamedInputs(StreamedImages(outliers_dir, None, size, threads), settings)
    images, _, _ = load_images(outliers_dir, split=None)
    if images is None or len(images) == 0:
        raise ValueError(f"{outliers_dir}: the outlier set has no images")
    if images.shape[1:3] != (size, size):
        raise ValueError(
            f"{outliers_dir}: outlier images are {images.shape[1]}x{images.shape[2]}, "
            f"the ID images {size}x{size}; curate them at the same size"
        )
    return MemoryInputs(to_model_input(images, settings.mean, settings.std), settings, upsample)


class MemoryInputs:
    """Decoded, normalised images; train views by crop-padding/flip, then upsampling."""

    def __init__(self, inputs: torch.Tensor, settings: TrainSettings, upsample: int | None):
        self.inputs, self.settings, self.upsample = inputs, settings, upsample

    def __len__(self) -> int:
        return len(self.inputs)

    def start_epoch(self, calls: list[torch.Tensor], gen: torch.Generator) -> None:
        """Nothing to prefetch: the images are decoded already."""

    def views(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return resize_input(augment(self.inputs[idx], self.settings, gen), self.upsample)

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every image un-augmented, in order, `batch_size` at a time."""
        for x in self.inputs.split(batch_size):
            yield resize_input(x, self.upsample)


class StreamedInputs:
    """Images decoded per batch: random-resized crops at the backbone's size to train,
    central crops to evaluate (`ood.data.views`).

    After `start_epoch`, the next PREFETCH batches are decoded in the background
    while the model trains on the current one.
    """

    def __init__(self, images: StreamedImages, settings: TrainSettings):
        self.images, self.settings = images, settings
        self._ahead = ThreadPoolExecutor(max_workers=1)  # orders batches; images has the pool
        self._queue: deque[torch.Tensor] = deque()
        self._pending: deque[tuple[torch.Tensor, Future]] = deque()
        self._gen: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.images)

    def start_epoch(self, calls: list[torch.Tensor], gen: torch.Generator) -> None:
        """Decode ahead the batches `views` will be asked for, in that order. Their
        uniforms are drawn from `gen` in that order too, so timing never changes a view."""
        for _, future in self._pending:
            future.cancel()
        self._queue, self._pending, self._gen = deque(calls), deque(), gen
        for _ in range(PREFETCH):
            self._submit()

    def _submit(self) -> None:
        if self._queue:
            idx = self._queue.popleft()
            draws = torch.rand((len(idx), DRAWS), generator=self._gen).numpy()
            job = self._ahead.submit(self.images.batch_from_draws, idx, draws, self.settings.hflip)
            self._pending.append((idx, job))

    def views(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The next prefetched batch (which must be of rows `idx`); without
        `start_epoch`, decoded now with uniforms from `gen`."""
        if self._pending:
            expected, job = self._pending.popleft()
            if not torch.equal(expected, idx):
                raise RuntimeError("streamed batches asked for out of the order announced")
            self._submit()
            batch = job.result()
        else:
            batch = self.images.batch(idx, gen, hflip=self.settings.hflip)
        return to_model_input(batch, self.settings.mean, self.settings.std)

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.images), batch_size):
            batch = self.images[start : start + batch_size]
            yield to_model_input(batch, self.settings.mean, self.settings.std)


def make_optimizer(model: nn.Module, extra: nn.Module | None, settings: TrainSettings, steps: int):
    """Optimiser and per-step schedule (linear warm-up, then cosine) for one phase."""
    if settings.optimizer == "sgd":
        params = list(model.parameters()) + (list(extra.parameters()) if extra else [])
        optimizer = torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=settings.nesterov,
        )
    else:
        from timm.optim import create_optimizer_v2

        # timm groups the parameters (no decay on norms and biases; per-block lr
        # scales with layer_decay); the scale is applied once here, the schedule
        # below then multiplies every group alike.
        optimizer = create_optimizer_v2(
            model,
            "adamw",
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            layer_decay=None if settings.layer_decay == 1.0 else settings.layer_decay,
        )
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * group.pop("lr_scale", 1.0)
        if extra is not None:  # decay matrices, not biases, norms or tokens (as timm does)
            params = list(extra.parameters())
            for decay, group in (
                (settings.weight_decay, [p for p in params if p.ndim > 1]),
                (0.0, [p for p in params if p.ndim <= 1]),
            ):
                if group:
                    optimizer.add_param_group(
                        {"params": group, "lr": settings.lr, "weight_decay": decay}
                    )
    warmup = min(settings.warmup_epochs * steps // max(settings.epochs, 1), steps - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps - warmup, 1))
    if warmup <= 0:
        return optimizer, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(
        optimizer, [ramp, cosine], milestones=[warmup]
    )


def _settings_digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    # Multi-phase methods (mood) add the phase of each epoch.
    columns = LOG_COLUMNS + (("phase",) if rows and "phase" in rows[0] else ())
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def train(
    dataset_dir: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    log_path: str | os.PathLike,
    *,
    method: str,
    backbone: str,
    settings: TrainSettings,
    seed: int,
    device: str = "auto",
    threads: int | None = None,
    resume_dir: str | os.PathLike | None = None,
    outliers_dir: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    teacher_backbone: str | None = None,
    stop_after_epoch: int | None = None,  # for tests: simulate a kill after this epoch
) -> dict:
    """Train `method` on the train split of a curated dataset; returns the checkpoint meta.

    `outliers_dir`: a curated dataset whose images (all splits) are the
    auxiliary outliers of methods that train on them (oe, ...). `teacher`: a
    checkpoint to distil from (oaml): `ood train` output, or a bare state dict of
    timm backbone `teacher_backbone`.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    dev = select_device(device)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")

    size = BACKBONES[backbone].input_size
    if settings.images == "stream":
        inputs = StreamedInputs(StreamedImages(dataset_dir, "train", size, threads), settings)
        labels, image_side, upsample = inputs.images.labels, size, None
    else:
        images, labels, _ = load_images(dataset_dir, split="train")
        upsample = input_size_for(images.shape, size, f"{dataset_dir} (backbone {backbone!r})")
        # augmented at their own size, then upsampled
        inputs = MemoryInputs(
            to_model_input(images, settings.mean, settings.std), settings, upsample
        )
        image_side = images.shape[1]
        del images
    num_classes = int(labels.max()) + 1
    targets = torch.as_tensor(labels)
    n = len(targets)
    steps_per_epoch = (n + settings.batch_size - 1) // settings.batch_size

    objective = get_objective(method, settings.method_params)
    outliers = _outlier_inputs(objective, outliers_dir, image_side, settings, upsample, threads)
    outlier_batch = settings.outlier_batch_size or 2 * settings.batch_size
    if objective.needs_teacher and not teacher:
        raise ValueError(
            f"method {method!r} distils from a teacher; give one (config: methods.{method}.teacher)"
        )
    if teacher and not objective.needs_teacher:
        raise ValueError(f"method {method!r} takes no teacher (got {teacher})")
    num_logits = objective.num_outputs(num_classes)
    torch.manual_seed(seed)
    model = build_model(backbone, num_logits, settings.pretrained).to(dev)
    context = TrainContext(
        num_classes=num_classes,
        class_counts=torch.bincount(targets, minlength=num_classes).float(),
        input_size=size,
        device=dev,
        teacher=str(teacher) if teacher else None,
        teacher_backbone=teacher_backbone,
    )
    extra = objective.setup(model, context)
    if extra is not None:
        extra.to(dev)
    trained = nn.ModuleList([model] if extra is None else [model, extra])
    on_gpu = dev.type == "cuda"
    layout = torch.channels_last if on_gpu and settings.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    use_amp = on_gpu and settings.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)  # a pass-through when disabled
    phases = objective.phases(settings)
    # The epoch each phase starts at, counted over all phases.
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    total_epochs = sum(p.epochs for p in phases)
    meta = {
        "method": method,
        "backbone": backbone,
        "num_classes": num_classes,
        "num_logits": num_logits,
        "seed": seed,
        "settings": asdict(settings),
        "dataset_manifest_sha256": manifest_sha256(dataset_dir),
        "n_train": n,
    }
    if len(phases) > 1:
        meta["phases"] = [{"name": p.name, "epochs": p.epochs, "lr": p.settings.lr} for p in phases]
    meta.update(objective.meta())
    if outliers is not None:
        meta["outliers_manifest_sha256"] = manifest_sha256(outliers_dir)
        meta["n_outliers"] = len(outliers)
    if teacher:
        meta["teacher_sha256"] = sha256_file(teacher)
    digest = _settings_digest(meta)

    def phase_of(epoch: int) -> int:
        return max(i for i, begin in enumerate(starts) if begin <= epoch)

    def begin_phase(index: int):
        phase = phases[index]
        # Warm-up counts in the phase's own epochs.
        phase_settings = replace(phase.settings, epochs=phase.epochs)
        return make_optimizer(model, extra, phase_settings, phase.epochs * steps_per_epoch)

    rows: list[dict] = []
    start_epoch = 0
    state = None
    resume_file = Path(resume_dir) / "last.pt" if resume_dir else None
    if resume_file and resume_file.exists():
        state = torch.load(resume_file, map_location="cpu", weights_only=False)
        if state.get("digest") == digest:
            trained.load_state_dict(state["model"])
            scaler.load_state_dict(state["scaler"])
            rows, start_epoch = state["rows"], state["epoch"]
            log.info("resuming %s from epoch %d (%s)", method, start_epoch, resume_file)
        else:
            log.info("ignoring %s: written for other settings", resume_file)
            state = None
    current = phase_of(min(start_epoch, total_epochs - 1)) if total_epochs else 0
    optimizer, scheduler = begin_phase(current)
    # The saved optimiser belongs to the phase of the last finished epoch; at a
    # phase boundary the next phase starts fresh, as it does uninterrupted.
    if state is not None and state.get("phase", 0) == current:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    bar = tqdm(
        total=total_epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=f"train {method} seed {seed}",
        file=sys.stderr,
        mininterval=2.0,
    )
    for epoch in range(start_epoch, total_epochs):
        if phase_of(epoch) != current:
            current = phase_of(epoch)
            optimizer, scheduler = begin_phase(current)
        phase = phases[current]
        trained.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        batches = [
            order[step * settings.batch_size : (step + 1) * settings.batch_size]
            for step in range(steps_per_epoch)
        ]
        # Streamed views draw from their own generators, in step order (decoded ahead).
        inputs.start_epoch(
            [idx for idx in batches for _ in range(objective.views)],
            torch.Generator().manual_seed(seed * 100_003 + epoch + 70_001),
        )
        if outliers is not None:  # their own stream: the ID draws stay those of ce
            outlier_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_001)
            outlier_order = torch.randperm(len(outliers), generator=outlier_gen)
            outlier_batches = [
                outlier_order[
                    torch.arange(step * outlier_batch, (step + 1) * outlier_batch) % len(outliers)
                ]
                for step in range(steps_per_epoch)
            ]
            outliers.start_epoch(
                outlier_batches, torch.Generator().manual_seed(seed * 100_003 + epoch + 90_001)
            )
        started = time.perf_counter()
        loss_sum, correct, scored = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = batches[step]
            views = [inputs.views(idx, gen).to(dev) for _ in range(objective.views)]
            target = targets[idx].to(dev)
            batch = Batch(views, target, epoch=epoch, phase=phase.name, gen=gen)
            if outliers is not None:
                batch.outliers = outliers.views(outlier_batches[step], outlier_gen).to(dev)
            if on_gpu:
                batch.views = [v.contiguous(memory_format=layout) for v in batch.views]
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                loss, logits = objective.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            if logits is not None:  # e.g. no class scores during masked-image pre-training
                correct += int((logits.argmax(1) == target).sum())
                scored += len(idx)
            bar.update(1)
        rows.append(
            {
                "epoch": epoch + 1,
                "loss": round(loss_sum / n, 6),
                "accuracy": round(correct / scored, 6) if scored else "",
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        if len(phases) > 1:
            rows[-1]["phase"] = phase.name
        log.info("epoch %d (%s): loss %.4f", epoch + 1, phase.name, rows[-1]["loss"])
        if resume_file:
            with atomic_path(resume_file) as tmp:
                torch.save(
                    {
                        "digest": digest,
                        "epoch": epoch + 1,
                        "phase": current,
                        "rows": rows,
                        "model": trained.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                    },
                    tmp,
                )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            bar.close()
            raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} as asked")
    bar.close()

    meta["epochs"] = total_epochs
    meta["final_train_accuracy"] = (
        rows[-1]["accuracy"] if rows and rows[-1]["accuracy"] != "" else None
    )
    save_checkpoint(checkpoint_path, model.cpu(), meta)
    _write_log(Path(log_path), rows)
    if resume_file:
        resume_file.unlink(missing_ok=True)  # the final checkpoint supersedes it
    return meta
