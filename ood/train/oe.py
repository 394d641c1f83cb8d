"""Outlier exposure (Hendrycks et al., ICLR 2019).

Cross-entropy on the ID batch plus `weight` times the cross-entropy from the
softmax on a batch of auxiliary outliers to the uniform distribution:

    loss = CE(f(x_id), y) + weight * mean_outliers( logsumexp(f(x)) - mean_c f(x)_c )

ID and outlier images go through the model in one forward pass, so batch
norm sees both, as in the paper's code. weight = 0.5 is the paper's value.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ood.train.objective import Batch, Objective


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of CE(softmax(logits), uniform) = logsumexp - mean logit."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


class OutlierExposure(Objective):
    name = "oe"
    summary = "CE on ID + weight * CE to uniform on auxiliary outliers"
    paper = "Hendrycks et al. 2019"
    backbone = "WideResNet / ResNet-18 (CIFAR)"
    scorers = ("msp", "energy")
    outliers = True
    defaults = {"weight": 0.5}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.outliers is None:
            raise ValueError("oe: the batch carries no outliers")
        size = len(batch.labels)
        logits = model(torch.cat([batch.views[0], batch.outliers]))
        inside, outside = logits[:size], logits[size:]
        loss = F.cross_entropy(inside, batch.labels)
        return loss + self.params["weight"] * uniform_cross_entropy(outside), inside
