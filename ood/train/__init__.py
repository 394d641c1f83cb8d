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
# Each method's parameter names (train.method_params), so that the config check
# at parse time catches a misspelt one without importing torch; the values are
# checked by the objective itself. A test keeps these equal to the defaults.
_ALPA_PARAMS = (
    "temperature",
    "feature_dim",
    "supcon_weight",
    "alpa_weight",
    "alpa_inverse_temperature",
    "width",
    "ce_weight",
)
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "ce": (),
    "supcon": ("temperature", "feature_dim", "ce_weight"),
    "mode_t": _ALPA_PARAMS,
    "mode_f": _ALPA_PARAMS,
    "oe": ("weight",),
    "oaml": (
        "kd_logit",
        "kd_feature",
        "club_id_ood",
        "club_ood_class",
        "kd_temperature",
        "structure_temperature",
        "club_hidden",
    ),
    "mos": ("groups",),
    "mood": ("mim_epochs", "mim_warmup_epochs", "mask_ratio", "mim_lr", "mim_weight_decay"),
    "imood": (
        "logit_adjust",
        "reg_weight",
        "pascl_weight",
        "temperature",
        "tail_fraction",
        "feature_dim",
    ),
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
