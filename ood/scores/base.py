"""The Scorer interface: a post-hoc OOD score computed from a feature dump.

Subclasses set the class attributes, validate parameters in `check_params`,
and implement `_score` (and `_fit` when `fits` is True). The public `fit` and
`score` do the checks every scorer shares.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np

from ood.io import FeatureSet


class Scorer:
    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()  # FeatureSet columns used: "logits", "feature"
    fits: ClassVar[bool] = False  # True if fit() needs the ID train dump
    defaults: ClassVar[dict[str, Any]] = {}
    summary: ClassVar[str] = ""
    params_help: ClassVar[dict[str, str]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            bad = ", ".join(repr(k) for k in unknown)
            raise ValueError(
                f"scorer {self.name!r}: unknown parameter(s) {bad}; allowed: {allowed}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.threads: int | None = None
        self._fitted = not self.fits
        self.check_params()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- parameter validation ------------------------------------------------

    def check_params(self) -> None:
        """Validate `self.params`; raise ValueError naming scorer and key."""

    def _param_error(self, key: str, expected: str) -> ValueError:
        return ValueError(
            f"scorer {self.name!r}: parameter {key!r} must be {expected}, got {self.params[key]!r}"
        )

    def _require_int(self, key: str, minimum: int) -> None:
        value = self.params[key]
        # bool is an int subclass; k=True is a config mistake, not k=1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise self._param_error(key, f"an integer >= {minimum}")
        self.params[key] = int(value)

    def _require_positive(self, key: str) -> None:
        value = self.params[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not np.isfinite(value)
            or value <= 0
        ):
            raise self._param_error(key, "a finite number > 0")
        self.params[key] = float(value)

    # -- fit / score ---------------------------------------------------------

    def fit(self, train: FeatureSet, threads: int | None = None) -> Scorer:
        """Fit on the ID train dump (a no-op unless `fits`); returns self.

        `threads` caps the threads of libraries that take a setting (faiss);
        None leaves their defaults.
        """
        self.threads = threads
        if not self.fits:
            return self
        if len(train) == 0:
            raise ValueError(f"scorer {self.name!r}: the ID train dump has no rows")
        n_ood = int(np.sum(train.label < 0))
        if n_ood:
            raise ValueError(
                f"scorer {self.name!r}: the train dump has {n_ood} OOD row(s) (label -1); "
                "fit needs ID train data only"
            )
        self._check_columns(train)
        self._fit(train)
        self._fitted = True
        return self

    def score(self, data: FeatureSet) -> np.ndarray:
        """Score every row of `data`: float64 array of shape (N,), higher = more ID."""
        if not self._fitted:
            raise RuntimeError(
                f"scorer {self.name!r} must be fitted on the ID train dump (call fit) before score"
            )
        if len(data) == 0:
            return np.empty(0, dtype=np.float64)
        self._check_columns(data)
        scores = np.asarray(self._score(data), dtype=np.float64)
        if scores.shape != (len(data),):
            raise AssertionError(
                f"scorer {self.name!r} returned shape {scores.shape}, expected ({len(data)},)"
            )
        return scores

    def _check_columns(self, data: FeatureSet) -> None:
        for column in self.needs:
            values = getattr(data, column)
            if values.ndim != 2 or values.shape[1] == 0:
                raise ValueError(
                    f"scorer {self.name!r} needs column {column!r}, which is empty "
                    f"(shape {values.shape})"
                )

    def _fit(self, train: FeatureSet) -> None:
        raise NotImplementedError

    def _score(self, data: FeatureSet) -> np.ndarray:
        raise NotImplementedError
