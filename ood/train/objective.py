"""What a training method is to the shared loop: an objective over one batch.

The loop (ood.train.loop) owns data, optimiser, schedule, checkpoints and
logs; a method only says what it needs per batch and computes the loss:

- `views`: how many independently augmented copies of each image it gets
  (2 for contrastive objectives);
- `outliers`: whether it trains on an auxiliary outlier set (then every
  batch carries a batch of outlier images);
- `build`: extra trainable modules beside the classifier (e.g. a projection
  head); they are optimised and resumed with the model but not saved in the
  classifier checkpoint the scorers read;
- `phases`: consecutive stages (e.g. masked-image pre-training, then
  fine-tuning), each with its own epochs, settings and a fresh optimiser and
  schedule; one phase by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ood.train.loop import TrainSettings


@dataclass
class Batch:
    """One step's data: `views[0]` is the augmented batch every method sees."""

    views: list[torch.Tensor]  # each (B, C, H, W)
    labels: torch.Tensor  # (B,) int64
    outliers: torch.Tensor | None = None  # (M, C, H, W) when the method asks for them
    epoch: int = 0  # 0-based, counted over all phases
    phase: str = "train"
    # The loop's per-epoch generator (seeded by seed and epoch): random draws an
    # objective makes from it (masks, pairings) replay exactly on resume.
    gen: torch.Generator | None = None


@dataclass
class TrainContext:
    """What an objective may need beyond the model, given once before training."""

    num_classes: int
    class_counts: torch.Tensor  # (num_classes,) train images per class (a class prior)
    input_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A trained model to distil from (oaml): a checkpoint path, and the timm
    # backbone name when the file is a bare state dict rather than `ood train` output.
    teacher: str | None = None
    teacher_backbone: str | None = None

    @classmethod
    def uniform(cls, num_classes: int, per_class: int = 1, input_size: int = 32) -> TrainContext:
        """A balanced context (tests and benchmarks building objectives by hand)."""
        counts = torch.full((num_classes,), float(per_class))
        return cls(num_classes=num_classes, class_counts=counts, input_size=input_size)


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    settings: TrainSettings


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
    context: TrainContext | None = None
    # A teacher checkpoint is required (oaml); the loop checks it is given.
    needs_teacher: ClassVar[bool] = False

    def setup(self, model: nn.Module, context: TrainContext) -> nn.Module | None:
        """Build and keep the extra modules (after the model, from the same seed)."""
        self.context = context
        self.extra = self.build(model, context.num_classes)
        return self.extra

    def phases(self, settings: TrainSettings) -> list[Phase]:
        """The training stages in order; one of `settings.epochs` epochs by default."""
        return [Phase("train", settings.epochs, settings)]

    @staticmethod
    def with_settings(settings: TrainSettings, **changes: Any) -> TrainSettings:
        return replace(settings, **changes)

    def build(self, model: nn.Module, num_classes: int) -> nn.Module | None:
        """Extra trainable modules beside the classifier; None for none."""
        return None

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, class scores of batch.views[0] for the train accuracy, or None)."""
        raise NotImplementedError
