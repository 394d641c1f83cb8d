"""ImOOD training-time regularisation (Liu et al., NeurIPS 2024) on top of PASCL.

Long-tailed ID data with a class prior pi_c = n_c / sum_k n_k (train counts,
`context.class_counts`) and a batch of auxiliary outliers (TinyImages-300K in
the paper). Two augmented views of each ID image and the outliers go through
the model in one forward pass (batch norm sees all of them, as in PASCL's
code); z = logits, f = penultimate feature. With ID rows i (both views, 2B)
and outlier rows o (M):

1. logit-adjusted cross-entropy on the ID rows, tau = `logit_adjust`:

       L_cls = mean_i CE(z_i + tau * log pi, y_i)

2. the prior-aligned OOD regulariser, weight `reg_weight` (ImOOD's
   `ada_bin_disc`): a binary ID-vs-outlier discriminator on the
   prior-adjusted energy

       s(x)  = logsumexp_c z_c                          (energy)
       beta(x) = mean_c softmax(z)_c / pi_c             (the ada_* scorers' beta)
       s'(x) = s(x) + log beta(x)    (= logsumexp_c(z_c - log pi_c) - log C)
       L_reg = mean_i softplus(-(s'_i + b)) + mean_o softplus(s'_o + b)

   i.e. binary cross-entropy of sigmoid(s' + b) with ID = 1, outlier = 0,
   the two means *summed* (each side weighted alike whatever M / 2B), with a
   learned scalar bias b. Gradients flow through beta as well as s. Training
   on s' makes s itself approach the balanced detector, so the paper tests
   the trained model with the plain score (bin_disc; here `energy`, which
   differs from s + b by a constant).

3. PASCL's auxiliary loss, weight `pascl_weight`: partial and asymmetric
   supervised contrastive learning on u = normalize(MLP(f)) of all 2B + M
   rows. Anchors are the ID rows of tail classes only (partial); anchor
   i's positives P(i) are the other ID rows of its class (its second view
   included), its denominator all other rows, outliers included; outliers
   are never anchors nor positives (asymmetric: only pushed away):

       L_pascl = mean_{tail i} -1/|P(i)| sum_{p in P(i)}
                 log( exp(u_i.u_p / t) / sum_{a != i} exp(u_i.u_a / t) )

   and 0 when the batch has no tail image. Tail classes: the
   C - round((1 - tail_fraction) * C) classes with the fewest train images
   (ties: the higher class index, the CIFAR-LT order), PASCL's rule
   `label >= round((1 - k) C)` on count-sorted classes.

   loss = L_cls + reg_weight * L_reg + pascl_weight * L_pascl

`loss` returns the unadjusted logits of views[0]: what the model predicts at
test time (logit adjustment trains z to be the balanced-prior logits).

Paper values: logit_adjust 1.0, reg_weight 0.5 (Lambda), pascl_weight 0.05
(Lambda2) from the ImOOD README's command lines; temperature 0.07,
tail_fraction 0.4 (k) and the projection head D -> D -> 128 from PASCL's
code. Our reading (the README gives only the flags): s = energy for the
discriminator, the sum of the two BCE means, CE and the regulariser over
both ID views (PASCL trains CE on both), beta from softmax of the
unadjusted logits (as the ada_* scorers compute it), and a denominator of
the contrastive term over every ID row of the batch (PASCL's code contrasts
tail anchors with tail rows and outliers only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ood.models.backbones import features_and_logits
from ood.train.objective import Batch, Objective, TrainContext
from ood.train.supcon import mlp, supcon_from_logits


def adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """Logit-adjusted CE (Menon et al. 2021): CE(logits + tau * log pi, y)."""
    return F.cross_entropy(logits + tau * log_prior, labels)


def prior_adjusted_score(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """s'(x) = logsumexp(z) + log(mean_c softmax(z)_c / pi_c), per row (N,)."""
    energy = torch.logsumexp(logits, dim=1)
    log_beta = torch.logsumexp(F.log_softmax(logits, dim=1) - log_prior, dim=1) - math.log(
        logits.shape[1]
    )
    return energy + log_beta


def discriminator_loss(inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logit), ID = 1 and outlier = 0: the mean over each side, summed."""
    return F.softplus(-inside).mean() + F.softplus(outside).mean()


def partial_asymmetric_supcon(
    z: torch.Tensor, labels: torch.Tensor, tail: torch.Tensor, n_outliers: int, temperature: float
) -> torch.Tensor:
    """PASCL's term over projections `z` (N_id + n_outliers, d), L2-normalised.

    The first N_id rows are ID with class `labels` (N_id,); `tail` (C,) bool
    marks the tail classes, whose ID rows are the anchors. 0 without one.
    """
    anchors = tail[labels]
    if not bool(anchors.any()):
        return z.sum() * 0.0  # keeps the graph (and the dtype) without moving anything
    # Outliers get label -1: no ID row is of their class, and they are not anchors.
    contrast_labels = torch.cat([labels, labels.new_full((n_outliers,), -1)])
    anchors = torch.cat([anchors, anchors.new_zeros(n_outliers)])
    return supcon_from_logits(z @ z.T / temperature, contrast_labels, anchors)


def tail_classes(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """(C,) bool: the C - round((1 - fraction) C) classes with the fewest train images."""
    num = len(counts)
    n_tail = num - round((1.0 - fraction) * num)
    rarest_first = sorted(range(num), key=lambda c: (float(counts[c]), -c))
    tail = torch.zeros(num, dtype=torch.bool)
    tail[rarest_first[:n_tail]] = True
    return tail


def _widen(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ImoodHeads(nn.Module):
    """The trainable parts beside the classifier: PASCL's projector and the bias b."""

    def __init__(self, width: int, feature_dim: int) -> None:
        super().__init__()
        self.projector = mlp(width, feature_dim)
        self.bias = nn.Parameter(torch.zeros(()))


class ImbalancedOOD(Objective):
    name = "imood"
    summary = (
        "logit-adjusted CE + reg_weight * BCE(ID vs outliers) on the prior-adjusted energy"
        " + pascl_weight * PASCL (tail anchors, outliers pushed away)"
    )
    paper = "Liu et al., NeurIPS 2024 (on PASCL, Wang et al., ICML 2022)"
    backbone = "ResNet-18 (CIFAR-LT), ResNet-50 (ImageNet-LT)"
    scorers = ("ada_msp", "ada_energy", "ada_mahalanobis", "msp", "energy")
    views = 2
    outliers = True
    defaults = {
        "logit_adjust": 1.0,
        "reg_weight": 0.5,
        "pascl_weight": 0.05,
        "temperature": 0.07,
        "tail_fraction": 0.4,
        "feature_dim": 128,
    }

    def check_param(self, key: str, value: Any) -> None:
        super().check_param(key, value)
        if key == "temperature" and value <= 0:
            raise ValueError(f"method 'imood': parameter 'temperature' must be > 0, got {value}")
        if key == "tail_fraction" and value > 1:
            raise ValueError(
                f"method 'imood': parameter 'tail_fraction' must be in [0, 1], got {value}"
            )
        if key == "feature_dim" and (value != int(value) or value < 1):
            raise ValueError(
                f"method 'imood': parameter 'feature_dim' must be a positive integer, got {value}"
            )

    def setup(self, model: nn.Module, context: TrainContext) -> nn.Module:
        counts = context.class_counts.detach().double().cpu()
        empty = torch.nonzero(counts <= 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"method 'imood': class(es) {empty} have no train images; the class prior "
                "(train counts) must be positive for every class"
            )
        self.prior = counts / counts.sum()  # float64; cast to the logits dtype in `loss`
        self.log_prior = self.prior.log()
        self.tail = tail_classes(counts, float(self.params["tail_fraction"]))
        return super().setup(model, context)

    def build(self, model: nn.Module, num_classes: int) -> nn.Module:
        return ImoodHeads(model.num_features, int(self.params["feature_dim"]))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.outliers is None:
            raise ValueError("imood: the batch carries no outliers")
        p = self.params
        size = len(batch.labels)
        n_id = 2 * size
        labels = batch.labels.repeat(2)
        feature, logits = features_and_logits(model, torch.cat([*batch.views[:2], batch.outliers]))
        # float32 at least for the losses under float16 autocast (1/t similarities).
        z = _widen(logits)
        log_prior = self.log_prior.to(z.device, z.dtype)
        loss = adjusted_cross_entropy(z[:n_id], labels, log_prior, p["logit_adjust"])
        if p["reg_weight"]:
            score = prior_adjusted_score(z, log_prior) + self.extra.bias
            loss = loss + p["reg_weight"] * discriminator_loss(score[:n_id], score[n_id:])
        if p["pascl_weight"]:
            u = F.normalize(_widen(self.extra.projector(feature)), dim=1)
            contrastive = partial_asymmetric_supcon(
                u, labels, self.tail.to(labels.device), len(batch.outliers), p["temperature"]
            )
            loss = loss + p["pascl_weight"] * contrastive
        return loss, logits[:size]
