"""The model behind the gradient scorers: a checkpoint on a device, in eval mode, frozen.

Only scorers that need gradients or input perturbation (needs "model") use
this module, so importing torch at the top is fine here; `ood.scores.gradient`
imports it inside its methods.

In eval mode every row of a batch is computed independently (batch norm uses
its running statistics), so the input gradient of a per-sample objective
summed over the batch is each sample's own gradient: one backward pass serves
a whole batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ood.models.backbones import features_and_logits, linear_classifier, load_checkpoint
from ood.models.specs import BACKBONES
from ood.train.loop import input_size_for, select_device, to_model_input

STAGES = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages for multi-layer features
STEM = ("conv1", "bn1", "act1", "maxpool")  # what timm's ResNet runs before layer1


class Network:
    """A trained classifier for gradient passes over uint8 NHWC images.

    `mean`/`std` are the per-channel normalisation of the training run; input
    steps are taken on the normalised input with the step divided by `std`,
    so step sizes are in [0, 1] pixel units (as in the ODIN code).
    """

    def __init__(
        self,
        model: nn.Module,
        meta: dict,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"network batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # Scorers differentiate w.r.t. inputs (or pass weights explicitly to torch.func):
        # the parameters never need gradients of their own.
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.meta = meta
        self.batch_size = int(batch_size)
        settings = meta["settings"]
        self.mean = [float(v) for v in settings["mean"]]
        self.std = [float(v) for v in settings["std"]]
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = std
        # Pixel values 0 and 1 in normalised coordinates (for steps that must stay images).
        self._low = (0.0 - mean) / std
        self._high = (1.0 - mean) / std

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        batch_size: int = 64,
        threads: int | None = None,
    ) -> Network:
        """Load a training run's checkpoint onto `device` ("auto": CUDA if visible)."""
        if threads:
            torch.set_num_threads(threads)
        model, meta = load_checkpoint(path)
        return cls(model, meta, select_device(device), batch_size)

    def __repr__(self) -> str:
        return (
            f"Network({self.meta.get('backbone')!r}, classes={self.num_classes}, "
            f"device={str(self.device)!r}, batch_size={self.batch_size})"
        )

    @property
    def input_size(self) -> int:
        return BACKBONES[self.meta["backbone"]].input_size

    @property
    def streamed(self) -> bool:
        """Trained on streamed views (`images: stream`): score the same eval views."""
        from ood.data.views import trained_on_streams

        return trained_on_streams(self.meta.get("settings", {}))

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def classifier(self) -> nn.Linear:
        """The last layer as an nn.Linear (logits = classifier(penultimate feature)).

        BiT's 1x1-conv classifier comes as a Linear sharing its weights.
        """
        return linear_classifier(self.model)

    # -- inputs ----------------------------------------------------------------

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) on the device."""
        upsample = input_size_for(images.shape, self.input_size, f"model {self.meta['backbone']!r}")
        x = to_model_input(np.ascontiguousarray(images), self.mean, self.std, upsample)
        return x.to(self.device)

    def batches(self, images: np.ndarray, desc: str) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, normalised input) per batch of `batch_size` images, with a progress bar."""
        for start in tqdm(
            range(0, len(images), self.batch_size), desc=desc, file=sys.stderr, mininterval=2.0
        ):
            rows = slice(start, min(start + self.batch_size, len(images)))
            yield rows, self.inputs(images[rows])

    # -- forward passes ----------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate feature, logits) of a normalised input batch."""
        feature, logits = features_and_logits(self.model, x)
        return feature, logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[1]

    def stage_features(self, x: torch.Tensor, upto: int = len(STAGES)) -> list[torch.Tensor]:
        """Outputs of the ResNet stages layer1..layer`upto`, each mean-pooled over space.

        Runs the network only as far as the last stage asked for. The pooled
        layer4 output is the penultimate feature (global average pooling).
        """
        if not 1 <= upto <= len(STAGES):
            raise ValueError(f"upto must be in 1..{len(STAGES)}, got {upto}")
        missing = [name for name in (*STEM, *STAGES) if not hasattr(self.model, name)]
        if missing:
            raise ValueError(
                f"multi-layer features need a ResNet ({', '.join(STEM + STAGES)}); "
                f"backbone {self.meta.get('backbone')!r} lacks {', '.join(missing)}"
            )
        for name in STEM:
            x = getattr(self.model, name)(x)
        pooled = []
        for name in STAGES[:upto]:
            x = getattr(self.model, name)(x)
            pooled.append(x.mean(dim=(2, 3)))
        return pooled

    # -- gradients and input steps ---------------------------------------------

    def input_gradient(
        self, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Per-sample gradient of `objective` (x -> (N,) values) w.r.t. the input batch x.

        One backward pass of the summed objective: rows do not interact in eval mode.
        """
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            values = objective(x)
            if values.shape != (len(x),):
                raise AssertionError(f"objective returned shape {tuple(values.shape)}")
            (gradient,) = torch.autograd.grad(values.sum(), x)
        return gradient

    def signed_step(
        self, x: torch.Tensor, gradient: torch.Tensor, eps: float, clamp: bool = False
    ) -> torch.Tensor:
        """x + eps * sign(gradient) / std: a step of eps pixel units up the gradient.

        `clamp` keeps the result a valid image (pixel values in [0, 1]).
        """
        stepped = x.detach() + eps * torch.sign(gradient) / self._std
        if clamp:
            stepped = torch.maximum(torch.minimum(stepped, self._high), self._low)
        return stepped
