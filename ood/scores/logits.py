"""Scorers computed from the logits alone (no fitting)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ood.io import FeatureSet
from ood.scores.base import Scorer


def _logits64(data: FeatureSet) -> np.ndarray:
    # float64 so that msp close to 1 and large energies keep their resolution.
    return np.asarray(data.logits, dtype=np.float64)


class MSP(Scorer):
    name = "msp"
    needs = ("logits",)
    summary = "maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)"

    def _score(self, data: FeatureSet) -> np.ndarray:
        logits = _logits64(data)
        # max softmax = exp(max logit - logsumexp): no overflow for large logits.
        return np.exp(logits.max(axis=1) - logsumexp(logits, axis=1))


class MaxLogit(Scorer):
    name = "maxlogit"
    needs = ("logits",)
    summary = "maximum logit (Hendrycks et al., ICML 2022)"

    def _score(self, data: FeatureSet) -> np.ndarray:
        return _logits64(data).max(axis=1)


class Energy(Scorer):
    name = "energy"
    needs = ("logits",)
    defaults = {"temperature": 1.0}
    params_help = {"temperature": "T > 0 in T * logsumexp(logits / T)"}
    summary = "negative free energy T * logsumexp(logits / T) (Liu et al., NeurIPS 2020)"

    def check_params(self) -> None:
        self._require_positive("temperature")

    def _score(self, data: FeatureSet) -> np.ndarray:
        t = self.params["temperature"]
        return t * logsumexp(_logits64(data) / t, axis=1)
