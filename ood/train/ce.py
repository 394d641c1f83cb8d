"""Plain cross-entropy: the baseline objective every scorer runs on."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ood.train.objective import Batch, Objective


class CrossEntropy(Objective):
    name = "ce"
    summary = "cross-entropy on the ID classes"
    paper = "the baseline of every paper"
    backbone = "any"
    scorers = ("msp", "maxlogit", "energy", "odin", "mahalanobis", "knn", "vim", "react", "ash")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.views[0])
        return F.cross_entropy(logits, batch.labels), logits
