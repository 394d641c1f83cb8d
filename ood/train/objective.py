"""What a training method is to the shared loop: an objective over one batch.

The loop (ood.train.loop) owns data, optimiser, schedule, checkpoints and
logs; a method only says what it needs per batch and computes the loss:

- `views`: how many independently augmented copies of each image it gets
  (2 for contrastive objectives);
- `outliers`: whether it trains on an auxiliary outlier set (then every
  batch carries a batch of outlier images);
- `build`: extra trainable modules beside the classifier (e.g. a projection
  head); they are optimised and resumed with the model but not saved in the
  classifier checkpoint the scorers read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Batch:
    """One step's data: `views[0]` is the augmented batch every method sees."""

    views: list[torch.Tensor]  # each (B, C, H, W)
    labels: torch.Tensor  # (B,) int64
    outliers: torch.Tensor | None = None  # (M, C, H, W) when the method asks for them


class Objective:
    name: ClassVar[str]
    summary: ClassVar[str]  # the objective, one line
    paper: ClassVar[str] = ""
    backbone: ClassVar[str] = ""  # the paper's backbone (`ood methods`)
    scorers: ClassVar[tuple[str, ...]] = ()  # the scorers the paper tests it with
    views: ClassVar[int] = 1
    outliers: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(unknown)}; known: {known}"
            )
        self.params = {**self.defaults, **params}
        for key, value in self.params.items():
            self.check_param(key, value)

    def check_param(self, key: str, value: Any) -> None:
        """Numbers >= 0 unless a method says otherwise."""
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"method {self.name!r}: parameter {key!r} must be a number >= 0, got {value!r}"
            )

    def num_outputs(self, num_classes: int) -> int:
        """Logits of the classifier head (more than the classes for group softmax)."""
        return num_classes

    def meta(self) -> dict:
        """What the checkpoint must carry for the scorers and tables (e.g. the groups)."""
        return {}

    extra: nn.Module | None = None

    def setup(self, model: nn.Module, num_classes: int) -> nn.Module | None:
        """Build and keep the extra modules (after the model, from the same seed)."""
        self.extra = self.build(model, num_classes)
        return self.extra

    def build(self, model: nn.Module, num_classes: int) -> nn.Module | None:
        """Extra trainable modules beside the classifier; None for none."""
        return None

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits of batch.views[0]) for one batch."""
        raise NotImplementedError
