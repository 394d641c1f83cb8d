"""Plain cross-entropy: the baseline objective every scorer runs on."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CrossEntropy:
    name = "ce"
    summary = "cross-entropy on the ID classes"

    def __init__(self, **params) -> None:
        if params:
            raise ValueError(f"method 'ce' takes no parameters, got {', '.join(sorted(params))}")

    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, logits) for one batch."""
        logits = model(images)
        return F.cross_entropy(logits, labels), logits
