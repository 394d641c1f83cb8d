"""Supervised contrastive learning (Khosla et al., NeurIPS 2020), as KNN+ trains it.

Two augmented views of each image go through the backbone and a projection
MLP (D -> D -> `feature_dim`, L2-normalised). For anchor i among the 2B
projections, with P(i) the other projections of its class (its own second
view included):

    loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )

averaged over anchors. The classifier the scorers read is a linear probe
trained beside it with cross-entropy on the detached features of the first
view (`ce_weight`), so it never shapes the representation, as in SupCon's
separate linear evaluation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ood.models.backbones import classify, features_and_logits
from ood.train.objective import Batch, Objective


def supcon_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor | None = None
) -> torch.Tensor:
    """SupCon over a pairwise logit matrix (N, N) (similarity / temperature).

    Anchor i's positives are the other entries of its class; the diagonal is
    left out of both the positives and the denominator. `anchors` (N,) bool
    restricts the anchors (rows) to a subset, every entry staying a contrast
    (PASCL's partial loss); None: every entry is an anchor.
    """
    n = len(logits)
    self_mask = torch.eye(n, dtype=torch.bool, device=logits.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    if anchors is not None:
        if not bool(anchors.any()):
            raise ValueError("supcon: no anchors selected")
        # Only the anchor rows are computed: a non-anchor without positives
        # would give 0/0, and NaN gradients even when left out of the mean.
        logits, self_mask, positives = logits[anchors], self_mask[anchors], positives[anchors]
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(1)
    if bool((count == 0).any()):
        raise ValueError("supcon: an anchor has no positive (each image needs two views)")
    per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(1) / count
    return per_anchor.mean()


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over projections `z` (N, d), already L2-normalised, with class `labels` (N,)."""
    return supcon_from_logits(z @ z.T / temperature, labels)


def mlp(width: int, out: int) -> nn.Module:
    """Two-layer MLP width -> width -> out (SupCon's projection head, ALPA's q/k/v)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, out))


class SupCon(Objective):
    name = "supcon"
    summary = "supervised contrastive loss on two views + linear probe (CE on detached features)"
    paper = "Khosla et al. 2020; KNN+ (Sun et al. 2022)"
    backbone = "ResNet-18 (CIFAR), ResNet-50 (ImageNet)"
    scorers = ("knn", "mahalanobis", "msp")
    views = 2
    defaults = {"temperature": 0.1, "feature_dim": 128, "ce_weight": 1.0}

    def build(self, model: nn.Module, num_classes: int) -> nn.Module:
        return mlp(model.num_features, int(self.params["feature_dim"]))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        projector = self.extra
        size = len(batch.labels)
        images = torch.cat(batch.views[:2])
        feature, _ = features_and_logits(model, images)
        z = F.normalize(projector(feature), dim=1)
        contrastive = supcon_loss(z, batch.labels.repeat(2), self.params["temperature"])
        logits = classify(model, feature[:size].detach())
        probe = F.cross_entropy(logits, batch.labels)
        return contrastive + self.params["ce_weight"] * probe, logits
