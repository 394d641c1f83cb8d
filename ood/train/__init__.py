"""Training objectives by method name; `ood.train.loop.train` runs any of them.

The registry maps names to import paths so that config checks at Snakefile
parse time can list the methods without importing torch.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "ce": "ood.train.ce:CrossEntropy",
    "supcon": "ood.train.supcon:SupCon",
    "mode_t": "ood.train.mode:ModeTrain",
    "mode_f": "ood.train.mode:ModeFinetune",
    "oe": "ood.train.oe:OutlierExposure",
    "oaml": "ood.train.oaml:OutlierAwareMetricLearning",
    "mos": "ood.train.mos:GroupSoftmax",
    "mood": "ood.train.mood:MaskedImageModeling",
    "imood": "ood.train.imood:ImbalancedOOD",
}
# Methods that train on an auxiliary outlier set (config: methods.<m>.outliers).
METHOD_OUTLIERS: set[str] = {"oe", "oaml", "imood"}
# Methods that distil from a teacher model (config: methods.<m>.teacher).
METHOD_TEACHER: set[str] = {"oaml"}
# Methods whose loss reads the last feature map (ALPA's local features).
METHOD_SPATIAL: set[str] = {"mode_t", "mode_f"}
# Methods that mask patch tokens (masked image modeling): a ViT-family backbone.
METHOD_TOKENS: set[str] = {"mood"}
# The classifier head a method trains: "flat" (one softmax over the classes) or
# "group" (MOS group softmax, each group with its "others" class). Decides
# which scorers apply to the method's models (ood.scores.applies).
METHOD_HEADS: dict[str, str] = {"mos": "group"}


def method_head(method: str) -> str:
    return METHOD_HEADS.get(method, "flat")


def method_needs_outliers(method: str) -> bool:
    return method in METHOD_OUTLIERS


def objective_class(method: str):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[method].split(":")
    return getattr(importlib.import_module(module), cls)


def get_objective(method: str, params: dict | None = None):
    return objective_class(method)(**(params or {}))
