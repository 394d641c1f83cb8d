"""Class token embeddings aligned with the ID images, and low-likelihood samples near them.

DreamOOD's first two steps, as OAML uses them:
1. Learn one token embedding e_c per ID class (D = the text encoder's token
   width) together with an image encoder h, so that the cosine of h(x) and e_c
   classifies the ID train images (cross-entropy over cosine / temperature).
   Only e_c's direction is learned; its norm is the mean norm of the text
   encoder's token table, so it reads like a word to the text encoder.
   The ID images then have embeddings z = h(x)/|h(x)| in the token space.
2. Per class, draw candidates z + sigma * noise around randomly chosen ID
   embeddings of that class, normalise them, and keep the `keep` candidates
   whose distance to their K-th nearest ID embedding of the class is largest:
   the low-likelihood region at the class boundary. A kept unit vector v becomes
   the token vector v * |e_c|, which replaces the class token in the prompt.

Our readings where DreamOOD's description is silent: e_c starts in a random
direction and keeps a typical token's norm; candidates are
`pool` draws per class around uniformly chosen ID embeddings; the image
encoder is a backbone from `ood.models` with a linear map to D.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ood.data.views import StreamedImages, check_images_mode
from ood.synthesis import check_positive, settings_from_dict

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    """Step 1 and 2 settings; the defaults are DreamOOD's where it gives one."""

    encoder: str = "resnet18_32"  # image encoder backbone (see `ood.models`)
    epochs: int = 10  # ours
    batch_size: int = 64
    lr: float = 0.1  # ours
    temperature: float = 0.05  # ours
    sigma: float = 0.07  # Gaussian noise around ID embeddings
    k: int = 300  # the K of the K-th nearest neighbour distance
    keep: int = 50  # outlier embeddings kept per class
    pool: int = 1000  # candidates drawn per class (ours)
    seed: int = 0
    # memory or stream, as the training setting (stream: any image sizes, decoded per batch)
    images: str = "memory"

    def __post_init__(self) -> None:
        check_positive(self, ("epochs", "batch_size", "k", "keep", "pool"))
        check_images_mode(self.images, "synthesis setting")
        if self.keep > self.pool:
            raise ValueError(
                f"synthesis setting keep ({self.keep}) exceeds pool ({self.pool}): "
                "keep is chosen from pool candidates"
            )
        if self.sigma < 0 or self.temperature <= 0 or self.lr <= 0:
            raise ValueError("synthesis settings sigma >= 0, temperature > 0 and lr > 0 are needed")

    @classmethod
    def from_dict(cls, values: dict) -> EmbedSettings:
        return settings_from_dict(cls, values, "synthesis")


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each query row to its k-th nearest row of `bank`."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} needs 1 <= k <= {len(bank)} (the bank's rows)")
    dist = torch.cdist(queries.double(), bank.double())
    return dist.topk(k, dim=1, largest=False).values[:, -1]


def select_boundary(
    candidates: torch.Tensor, bank: torch.Tensor, k: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(indices, distances)` of the `keep` candidates farthest from `bank` in k-NN distance,
    farthest first (ties: lower index first)."""
    dist = knn_distance(candidates, bank, k)
    # A stable sort on the negated distance keeps ties in index order on every device.
    order = torch.sort(-dist, stable=True).indices[:keep]
    return order, dist[order]


def sample_boundary(
    bank: torch.Tensor, settings: EmbedSettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(unit vectors (keep, D), their k-NN distances)` sampled near the boundary of `bank`,
    a class's unit-norm ID embeddings."""
    centres = bank[torch.randint(len(bank), (settings.pool,), generator=gen)]
    noise = torch.randn(centres.shape, generator=gen, dtype=centres.dtype)
    candidates = nn.functional.normalize(centres + settings.sigma * noise, dim=1)
    order, dist = select_boundary(candidates, bank, settings.k, settings.keep)
    return candidates[order], dist


class _Encoder(nn.Module):
    """Backbone features -> unit vectors in the token space (D)."""

    def __init__(self, backbone: str, num_classes: int, dim: int, input_size: int):
        super().__init__()
        from ood.models.backbones import build_model

        self.backbone = build_model(backbone, num_classes)
        with torch.no_grad():
            self.backbone.eval()
            width = self._feature(torch.zeros(1, 3, input_size, input_size)).shape[1]
        # Centring before the cosine: pooled ReLU features share one large mean direction,
        # which made every image land on the same class embedding at the first steps.
        self.project = nn.Sequential(nn.Linear(width, dim), nn.BatchNorm1d(dim))

    def _feature(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self._feature(x)), dim=1)


def _encoder_size(encoder: str) -> int:
    from ood.models.specs import BACKBONES

    if encoder not in BACKBONES:
        raise ValueError(
            f"synthesis setting encoder: unknown backbone {encoder!r}; "
            f"known: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[encoder].input_size


def _recalibrate_norms(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Batch-norm statistics as the exact mean over `batches`: a short training run
    leaves running averages far from them, and the ID embeddings are read in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def learn_embeddings(
    images: np.ndarray | StreamedImages,
    labels: np.ndarray,
    num_classes: int,
    token_table: torch.Tensor,
    settings: EmbedSettings,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(class embeddings (C, D), unit ID embeddings (N, D), train accuracy)`; the accuracy
    is that of the nearest class embedding, on the train images without augmentation.

    Trains the encoder and the class embeddings jointly (SGD, cosine schedule,
    random crops) on `images` (N, H, W, 3 uint8, or streamed views at the
    encoder's size) with `labels` in 0..C-1.
    """
    from ood.train.loop import (
        MemoryInputs,
        StreamedInputs,
        TrainSettings,
        input_size_for,
        to_model_input,
    )

    input_size = _encoder_size(settings.encoder)
    if isinstance(images, np.ndarray):
        loop = TrainSettings(batch_size=settings.batch_size)  # crop/flip, normalisation defaults
        size = input_size_for(images.shape, input_size, "synthesis encoder")
        inputs = MemoryInputs(to_model_input(images, loop.mean, loop.std), loop, size)
    else:  # random-resized crops and flips, as streamed training
        loop = TrainSettings(batch_size=settings.batch_size, hflip=True, images="stream")
        inputs = StreamedInputs(images, loop)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    dim = token_table.shape[1]
    mean_norm = float(token_table.detach().float().norm(dim=1).mean())
    # Only the direction is learned (the loss sees cosines); the norm stays a typical token's.
    direction = nn.Parameter(torch.randn(num_classes, dim, generator=gen).to(device))
    encoder = _Encoder(settings.encoder, num_classes, dim, input_size)
    encoder.to(device)
    steps_per_epoch = -(-len(images) // settings.batch_size)
    optimizer = torch.optim.SGD(
        [
            {"params": list(encoder.parameters()), "weight_decay": 5e-4},
            {"params": [direction], "weight_decay": 0.0},
        ],
        lr=settings.lr,
        momentum=0.9,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.epochs * steps_per_epoch
    )
    y_all = torch.as_tensor(labels, dtype=torch.long)
    bar = tqdm(range(settings.epochs), desc="class embeddings", unit="epoch", file=sys.stderr)
    for _ in bar:
        encoder.train()
        order = torch.randperm(len(images), generator=gen)
        for step in range(steps_per_epoch):
            pick = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            x = inputs.views(pick, gen)
            y = y_all[pick].to(device)
            z = encoder(x.to(device))
            logits = z @ nn.functional.normalize(direction, dim=1).T / settings.temperature
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    _recalibrate_norms(encoder, (x.to(device) for x in inputs.eval_batches(256)))
    encoder.eval()
    with torch.no_grad():
        z_all = torch.cat([encoder(x.to(device)).cpu() for x in inputs.eval_batches(256)])
    unit = nn.functional.normalize(direction.detach().cpu(), dim=1)
    # Accuracy of the nearest class embedding on the un-augmented train images.
    accuracy = float(((z_all @ unit.T).argmax(1) == y_all).float().mean())
    return unit * mean_norm, z_all, accuracy


def sample_outlier_embeddings(
    class_emb: torch.Tensor, id_emb: torch.Tensor, labels: np.ndarray, settings: EmbedSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(token vectors (C, keep, D), k-NN distances (C, keep))`: per class, the kept unit
    samples scaled to the class embedding's norm."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    labels = torch.as_tensor(labels)
    vectors, distances = [], []
    for c in range(len(class_emb)):
        bank = id_emb[labels == c]
        if len(bank) < settings.k:
            raise ValueError(
                f"synthesis setting k={settings.k} needs at least {settings.k} ID train images "
                f"per class; class {c} has {len(bank)} (lower k)"
            )
        unit, dist = sample_boundary(bank, settings, gen)
        vectors.append(unit * class_emb[c].norm())
        distances.append(dist)
    return torch.stack(vectors), torch.stack(distances)


def embed(
    id_dir: str | os.PathLike,
    pipeline_dir: str | os.PathLike,
    out: str | os.PathLike,
    settings: EmbedSettings,
    *,
    device: str = "auto",
    threads: int | None = None,
) -> dict:
    """Learn the class embeddings on the ID train split, sample outlier embeddings, save `out`."""
    from ood.data.manifest import load_images, manifest_sha256
    from ood.io import atomic_path
    from ood.synthesis.pipeline import load_text_encoder, token_embeddings
    from ood.train.loop import select_device

    if threads:
        torch.set_num_threads(threads)
    # As in training: the same bytes from the same inputs, on one machine or a cluster.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if settings.images == "stream":
        size = _encoder_size(settings.encoder)
        images = StreamedImages(id_dir, "train", size, threads)
        labels = images.labels
    else:
        images, labels, _ = load_images(id_dir, split="train")
    num_classes = int(labels.max()) + 1
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"{id_dir}: train split has no images of class(es) {missing}")
    # Without the class token: its row is random and would move the mean token norm.
    _, text_encoder = load_text_encoder(pipeline_dir, placeholder=False)
    table = token_embeddings(text_encoder)
    class_emb, id_emb, accuracy = learn_embeddings(
        images, labels, num_classes, table, settings, select_device(device)
    )
    vectors, distances = sample_outlier_embeddings(class_emb, id_emb, labels, settings)
    result = {
        "class_embeddings": class_emb,
        "vectors": vectors,
        "knn_distance": distances,
        "settings": asdict(settings),
        "num_classes": num_classes,
        "train_accuracy": accuracy,
        "id_manifest_sha256": manifest_sha256(id_dir),
    }
    with atomic_path(out) as tmp:
        torch.save(result, tmp)
    log.info(
        "%s: %d classes x %d outlier embeddings (encoder train accuracy %.3f)",
        out,
        num_classes,
        settings.keep,
        accuracy,
    )
    return result
