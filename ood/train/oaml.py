"""Outlier Aware Metric Learning (OAML; Gao, He, Qiu, Pu, Fudan University).

A student classifier trains on the ID batch plus a batch of auxiliary
outliers (the paper synthesises them with Stable Diffusion; here any outlier
set), distilling from a frozen pretrained teacher (a ViT in the paper):

    loss = CE(s(x_id), y)
         + kd_logit       * T^2 KL( softmax(t(x_id)/T) || softmax(s(x_id)/T) )
         + kd_feature     * mean_i KL( P_t[i] || P_s[i] )
         + club_id_ood    * CLUB( ID feature ; outlier feature )
         + club_ood_class * CLUB( outlier feature ; softmax(s(outlier)) )
         - (log-likelihood fit of CLUB's variational networks; reaches only them)

- P[i] (distance structure): over the ID + outlier batch, row i of the
  pairwise Euclidean distances of the penultimate features (diagonal left
  out), divided by their mean and turned into softmax(-d / structure_temperature).
  Student and teacher features differ in width; only their distances meet.
- CLUB (Cheng et al., ICML 2020, contrastive log-ratio upper bound of mutual
  information) with q(y|x) = N(mu(x), diag exp(logvar(x))), mu and logvar
  small MLPs (logvar through tanh, as CLUB's reference code does), kept in
  `self.extra`:  I(x; y) <= mean_i log q(y_i|x_i) - mean_{i,j} log q(y_j|x_i).
  q is fitted by maximising log q(y_i|x_i) on detached inputs; the estimate is
  minimised w.r.t. the features with q's parameters held fixed (a functional
  call on detached parameters), so minimising it never trains q to shrink it.

The weights 4, 8, 0.1, 0.2 are the paper's (kd_logit, kd_feature,
club_id_ood, club_ood_class). Ours: the KD temperature (4), the
distance-structure temperature (0.1), CLUB's hidden width (256), and the
reading of the two CLUB terms, which the authors' README does not spell out:
term 1 pairs ID and outlier rows by a random permutation drawn from the
loop's generator (min(B, M) pairs), term 2 separates each outlier's feature
from its predicted class distribution (outliers carry no class semantics).

The teacher (an `ood train` checkpoint, or a bare state dict / official
.npz of backbone `teacher_backbone`) must classify the same classes; it sees
the student's normalised batch resized (bilinear) to its own input size, is
frozen and in eval mode, and is not part of the trained or saved modules.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ood.models.backbones import (
    build_model,
    features_and_logits,
    load_checkpoint,
    unwrap_state_dict,
)
from ood.models.specs import BACKBONES
from ood.train.objective import Batch, Objective, TrainContext

LOG_2PI = math.log(2 * math.pi)


# --- the terms --------------------------------------------------------------------------


def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over rows."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return temperature**2 * kl


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances; clamped before the root so equal rows give no NaN grad."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(1e-12).sqrt()


def distance_structure_log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, N-1): row i = log softmax_j(-d_ij / (temperature * mean d)) over j != i."""
    n = len(x)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    d = pairwise_distances(x)[off].view(n, n - 1)
    return F.log_softmax(-d / (temperature * d.mean()), dim=1)


def distance_structure_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """mean over rows of KL(teacher row || student row) of the distance structures."""
    if len(student) < 2:
        raise ValueError("oaml: the distance structure needs at least two images")
    log_s = distance_structure_log_probs(student, temperature)
    log_t = distance_structure_log_probs(teacher, temperature)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean()


class GaussianQ(nn.Module):
    """CLUB's variational q(y|x) = N(mu(x), diag exp(logvar(x)))."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)


def gaussian_log_density(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Row-wise log N(y; mu, diag exp(logvar))."""
    return -0.5 * ((y - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def club_estimate(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i log q(y_i|x_i) - mean_{i,j} log q(y_j|x_i), for q(.|x_i) = N(mu_i, exp(logvar_i)).

    Row i's log-variance and constant cancel between the two means, so only the
    squared deviations are summed (no large terms cancelling in float32); the
    double mean in O(N d): mean_j (y_j - mu_i)^2 = Var_j(y) + (mean_j y - mu_i)^2.
    """
    spread = y.var(0, unbiased=False) + (y.mean(0) - mu) ** 2
    return (0.5 * (spread - (y - mu) ** 2) * torch.exp(-logvar)).sum(1).mean()


def club(q: GaussianQ, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, fit): the bound to minimise (gradient to x and y, none to q) and
    q's mean log-likelihood to maximise (gradient to q only)."""
    fit = gaussian_log_density(y.detach(), *q(x.detach())).mean()
    frozen = {name: p.detach() for name, p in q.named_parameters()}
    mu, logvar = functional_call(q, frozen, (x,))
    return club_estimate(mu, logvar, y), fit


def id_ood_pairs(
    n_id: int, n_ood: int, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """min(B, M) (ID row, outlier row) pairs: the first ID rows (the loop already
    shuffles them) with outliers in an order drawn from `gen` (in order without one)."""
    n = min(n_id, n_ood)
    order = torch.randperm(n_ood, generator=gen) if gen is not None else torch.arange(n_ood)
    return torch.arange(n), order[:n]


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """The batch at the teacher's input size (bilinear); unchanged when it fits."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


# --- the teacher ------------------------------------------------------------------------


def _npz_head_classes(path: str) -> int | None:
    """Classes of an official .npz classifier head (ViT: head/kernel, BiT: head/conv2d/kernel)."""
    with np.load(path) as blob:
        for key in blob.files:
            if key.endswith(("head/kernel", "head/conv2d/kernel")):
                return int(blob[key].shape[-1])
    return None


def load_teacher(path: str, backbone: str | None, num_classes: int) -> tuple[nn.Module, str]:
    """(frozen eval-mode teacher on the CPU, its backbone name), checked to have `num_classes`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: teacher checkpoint not found")
    blob = None
    if not str(path).endswith(".npz"):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read the teacher checkpoint ({exc})") from None
    if isinstance(blob, dict) and isinstance(blob.get("meta"), dict) and "model" in blob:
        meta = blob["meta"]
        if backbone and backbone != meta["backbone"]:
            raise ValueError(
                f"{path}: teacher_backbone {backbone!r}, but the checkpoint holds "
                f"{meta['backbone']!r}"
            )
        outputs = meta.get("num_logits", meta["num_classes"])
        if meta["num_classes"] != num_classes or outputs != num_classes:
            raise ValueError(
                f"{path}: the teacher classifies {meta['num_classes']} classes with {outputs} "
                f"logits; the student has {num_classes} classes"
            )
        teacher, _ = load_checkpoint(path)
        name = meta["backbone"]
    else:
        if not backbone:
            raise ValueError(
                f"{path}: the teacher is a bare state dict, not `ood train` output; give its "
                "backbone (teacher_backbone, e.g. vit_b16_224)"
            )
        if backbone not in BACKBONES:
            raise ValueError(
                f"unknown teacher backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}"
            )
        # build_model would silently re-initialise a head of another size: check it first.
        key = f"{BACKBONES[backbone].head}.weight"
        if blob is None:
            classes = _npz_head_classes(path)
        else:
            state = unwrap_state_dict(blob, path)
            classes = int(state[key].shape[0]) if key in state else None
        if classes is None:
            raise ValueError(
                f"{path}: no classifier head ({key}) in the teacher; it must classify the "
                f"{num_classes} ID classes"
            )
        if classes != num_classes:
            raise ValueError(
                f"{path}: the teacher classifies {classes} classes; the student has {num_classes}"
            )
        teacher = build_model(backbone, num_classes, checkpoint=path)
        name = backbone
    teacher.requires_grad_(False)
    return teacher.eval(), name


# --- the objective ----------------------------------------------------------------------


class OutlierAwareMetricLearning(Objective):
    name = "oaml"
    summary = (
        "CE + KD from a frozen teacher (logits, feature distance structure) "
        "+ CLUB mutual-information bounds (ID vs outlier, outlier vs class)"
    )
    paper = "OAML, Gao et al. (Fudan University)"
    backbone = "ResNet-18 student, ViT-B/16 teacher"
    scorers = ("energy", "msp")
    outliers = True
    needs_teacher = True
    defaults = {
        "kd_logit": 4.0,  # paper
        "kd_feature": 8.0,  # paper
        "club_id_ood": 0.1,  # paper
        "club_ood_class": 0.2,  # paper
        "kd_temperature": 4.0,  # ours
        "structure_temperature": 0.1,  # ours
        "club_hidden": 256,  # ours
    }

    teacher: nn.Module | None = None
    teacher_name: str | None = None
    teacher_size: int | None = None

    def check_param(self, key, value) -> None:
        super().check_param(key, value)
        if key in ("kd_temperature", "structure_temperature") and value <= 0:
            raise ValueError(f"method 'oaml': parameter {key!r} must be > 0, got {value!r}")
        if key == "club_hidden" and (value != int(value) or value < 1):
            raise ValueError(
                f"method 'oaml': parameter 'club_hidden' must be an integer >= 1, got {value!r}"
            )

    def build(self, model: nn.Module, num_classes: int) -> nn.Module:
        width, hidden = model.num_features, int(self.params["club_hidden"])
        return nn.ModuleDict(
            {
                "id_ood": GaussianQ(width, width, hidden),
                "ood_class": GaussianQ(width, num_classes, hidden),
            }
        )

    def setup(self, model: nn.Module, context: TrainContext) -> nn.Module:
        extra = super().setup(model, context)  # q-nets first: their init ignores the teacher
        if not context.teacher:
            raise ValueError("method 'oaml' distils from a teacher; none given")
        teacher, name = load_teacher(context.teacher, context.teacher_backbone, context.num_classes)
        self.teacher = teacher.to(context.device)
        self.teacher_name = name
        self.teacher_size = BACKBONES[name].input_size
        return extra

    def meta(self) -> dict:
        return {"teacher_backbone": self.teacher_name} if self.teacher_name else {}

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return features_and_logits(self.teacher, resize_to(images, self.teacher_size))

    def terms(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Each term of the loss (unweighted), the q-nets' log-likelihood `fit`, and
        `logits` (the student's on the ID batch)."""
        if batch.outliers is None:
            raise ValueError("oaml: the batch carries no outliers")
        if self.teacher is None or self.extra is None:
            raise ValueError("oaml: no teacher; call setup(model, context) first")
        p = self.params
        size = len(batch.labels)
        images = torch.cat([batch.views[0], batch.outliers])
        feature, logits = features_and_logits(model, images)
        t_feature, t_logits = self.teacher_outputs(images)
        # Distances (x.x - 2 x.y + y.y) and densities lose too much in float16.
        with torch.autocast(images.device.type, enabled=False):
            feature, logits = feature.float(), logits.float()
            t_feature, t_logits = t_feature.float(), t_logits.float()
            inside = logits[:size]
            id_rows, ood_rows = id_ood_pairs(size, len(batch.outliers), batch.gen)
            ood_feature = feature[size:]
            id_ood, fit_id_ood = club(
                self.extra["id_ood"],
                feature[id_rows.to(feature.device)],
                ood_feature[ood_rows.to(feature.device)],
            )
            ood_class, fit_ood_class = club(
                self.extra["ood_class"], ood_feature, torch.softmax(logits[size:], dim=1)
            )
            return {
                "ce": F.cross_entropy(inside, batch.labels),
                "kd_logit": kd_logits(inside, t_logits[:size], p["kd_temperature"]),
                "kd_feature": distance_structure_kl(feature, t_feature, p["structure_temperature"]),
                "club_id_ood": id_ood,
                "club_ood_class": ood_class,
                "fit": fit_id_ood + fit_ood_class,
                "logits": inside,
            }

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.terms(model, batch)
        total = t["ce"] - t["fit"]  # the fit's gradient reaches only the q-nets
        for key in ("kd_logit", "kd_feature", "club_id_ood", "club_ood_class"):
            total = total + self.params[key] * t[key]
        return total, t["logits"]
