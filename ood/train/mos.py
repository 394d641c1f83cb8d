"""MOS group-softmax training (Huang & Li, CVPR 2021).

The classes are split into groups (config: method_params.groups, a list of
lists of class ids or a JSON file holding one; for ImageNet the 8 taxonomy
groups); each group gets an extra "others" class (layout: ood.groups). An
image of class c in group g has target c in g and "others" in every other
group; the loss is the sum over groups of the group cross-entropies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ood.groups import check_groups, group_sizes
from ood.train.objective import Batch, Objective


class GroupSoftmax(Objective):
    name = "mos"
    summary = "sum over class groups of the group-softmax cross-entropy (each with 'others')"
    paper = "Huang & Li, CVPR 2021"
    backbone = "BiT-S-R101x1 (ImageNet)"
    scorers = ("mos", "knn", "mahalanobis")
    defaults = {"groups": None}

    def check_param(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("method 'mos': give method_params.groups (lists of class ids)")
        if isinstance(value, str) and not Path(value).is_file():
            raise ValueError(f"method 'mos': groups file {value} not found")

    def num_outputs(self, num_classes: int) -> int:
        raw = self.params["groups"]
        if isinstance(raw, str):
            raw = json.loads(Path(raw).read_text())
        try:
            self.groups = check_groups(raw, num_classes)
        except ValueError as exc:
            raise ValueError(f"method 'mos': {exc}") from None
        sizes = group_sizes(self.groups)
        # target[g][c]: c's position in group g (1..|g|), or 0 ("others") if c is not in g.
        self.targets = torch.zeros(len(self.groups), num_classes, dtype=torch.long)
        for g, members in enumerate(self.groups):
            for position, c in enumerate(members, start=1):
                self.targets[g, c] = position
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        return sum(sizes)

    def meta(self) -> dict:
        return {"group_sizes": group_sizes(self.groups), "group_classes": self.groups}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.views[0])
        targets = self.targets.to(logits.device)[:, batch.labels]  # (G, B)
        loss = logits.new_zeros(())
        class_scores = logits.new_empty(len(batch.labels), self.targets.shape[1])
        for g, members in enumerate(self.groups):
            block = logits[:, self.starts[g] : self.starts[g] + len(members) + 1]
            loss = loss + F.cross_entropy(block, targets[g])
            class_scores[:, members] = F.log_softmax(block, dim=1)[:, 1:].detach()
        return loss, class_scores
