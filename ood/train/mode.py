"""MODE's training objective: Attention-based Local PropAgation (ALPA).

From the last feature map of each view (B, D, H, W: P = H * W local
features), three small MLPs give queries, keys and values of width `width`
(80 in the paper). For a pair of images (i, j), i's queries attend over j's
keys, which carries j's values to i's positions:

    a_ij[p]  = softmax_q( q_i[p] . k_j[q] / sqrt(width) ) @ v_j
    s_ij     = mean_p cos( v_i[p], a_ij[p] )

and a supervised contrastive loss runs over the similarities scaled by the
inverse temperature (10): images of one class should align locally.

- mode_t trains from scratch: SupCon on the pooled projection + alpa_weight
  * ALPA (1.0 in the paper);
- mode_f fine-tunes a pretrained model with ALPA alone (set
  `train.pretrained` to the weights).

Both train a linear probe beside it on the detached pooled features (the
logits the scorers read); MODE itself is tested with csd (multi-scale kNN).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ood.models.backbones import classify
from ood.train.objective import Batch, Objective
from ood.train.supcon import mlp, supcon_from_logits, supcon_loss


def alpa_similarity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, N) similarities s_ij from queries, keys, values of shape (N, P, w)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attention = torch.softmax(torch.einsum("ipc,jqc->ijpq", q, k) * scale, dim=-1)
    aligned = torch.einsum("ijpq,jqc->ijpc", attention, v)  # j's values at i's positions
    own = F.normalize(v, dim=-1)[:, None]  # (N, 1, P, w)
    return (own * F.normalize(aligned, dim=-1)).sum(-1).mean(-1)


class ModeTrain(Objective):
    name = "mode_t"
    summary = "SupCon + ALPA (cross-attention local alignment, contrastive) from scratch"
    paper = "MODE, Zhang et al. 2023 (ALPA-train)"
    backbone = "ResNet-18 (CIFAR)"
    scorers = ("csd", "knn")
    views = 2
    defaults = {
        "temperature": 0.1,  # SupCon on the pooled projection
        "feature_dim": 128,
        "supcon_weight": 1.0,
        "alpa_weight": 1.0,
        "alpa_inverse_temperature": 10.0,
        "width": 80,
        "ce_weight": 1.0,  # the linear probe on detached features
    }

    def build(self, model: nn.Module, num_classes: int) -> nn.Module:
        width, depth = model.num_features, int(self.params["width"])
        modules = {name: mlp(width, depth) for name in ("query", "key", "value")}
        if self.params["supcon_weight"] > 0:
            modules["projector"] = mlp(width, int(self.params["feature_dim"]))
        return nn.ModuleDict(modules)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        size = len(batch.labels)
        labels = batch.labels.repeat(2)
        feature_map = model.forward_features(torch.cat(batch.views[:2]))
        feature = model.forward_head(feature_map, pre_logits=True)
        local = feature_map.flatten(2).transpose(1, 2)  # (N, P, D)
        q, k, v = (self.extra[name](local) for name in ("query", "key", "value"))
        similarity = alpa_similarity(q, k, v)
        loss = self.params["alpa_weight"] * supcon_from_logits(
            similarity * self.params["alpa_inverse_temperature"], labels
        )
        if self.params["supcon_weight"] > 0:
            z = F.normalize(self.extra["projector"](feature), dim=1)
            loss = loss + self.params["supcon_weight"] * supcon_loss(
                z, labels, self.params["temperature"]
            )
        logits = classify(model, feature[:size].detach())
        return loss + self.params["ce_weight"] * F.cross_entropy(logits, batch.labels), logits


class ModeFinetune(ModeTrain):
    name = "mode_f"
    summary = "ALPA fine-tuning of a trained model (methods.<m>.init or train.pretrained)"
    paper = "MODE, Zhang et al. 2023 (ALPA-finetune)"
    defaults = {**ModeTrain.defaults, "supcon_weight": 0.0}
