"""Registry of post-hoc OOD scorers, one module per family.

Importing this package must stay cheap: no torch, no faiss (scorers import
heavy libraries inside fit/score).
"""

from __future__ import annotations

from typing import Any

from ood.scores.base import Scorer
from ood.scores.distance import KNN, Mahalanobis
from ood.scores.logits import MSP, Energy, MaxLogit

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (MSP, MaxLogit, Energy, Mahalanobis, KNN)
}


class UnknownScorerError(KeyError, ValueError):
    """An unregistered scorer name; catchable as KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def get_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    """Instantiate the scorer `name` with `params` (validated against its defaults)."""
    try:
        cls = SCORERS[name]
    except KeyError:
        known = ", ".join(SCORERS)
        raise UnknownScorerError(f"unknown scorer {name!r}; known: {known}") from None
    return cls(**(params or {}))


def describe() -> list[str]:
    """One line per scorer, for the `ood scorers` command."""
    width = max(len(name) for name in SCORERS)
    lines = []
    for name, cls in SCORERS.items():
        params = ", ".join(
            f"{key}={value!r}" + (f" ({cls.params_help[key]})" if key in cls.params_help else "")
            for key, value in cls.defaults.items()
        )
        lines.append(
            f"{name:<{width}}  needs={','.join(cls.needs)}  fits={'yes' if cls.fits else 'no'}"
            f"  params: {params or '-'}  -- {cls.summary}"
        )
    return lines


__all__ = ["SCORERS", "Scorer", "UnknownScorerError", "describe", "get_scorer"]
