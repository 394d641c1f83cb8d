"""Training objectives by method name; `ood.train.loop.train` runs any of them.

The registry maps names to import paths so that config checks at Snakefile
parse time can list the methods without importing torch.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "ce": "ood.train.ce:CrossEntropy",
}


def get_objective(method: str, params: dict | None = None):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[method].split(":")
    return getattr(importlib.import_module(module), cls)(**(params or {}))
