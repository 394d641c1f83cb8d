"""Scorers from distances in feature space to the ID train features."""

from __future__ import annotations

import numpy as np

from ood.io import FeatureSet
from ood.scores.base import Scorer

BATCH = 8192  # query rows per block: bounds the (rows x classes / k) work arrays
NORM_EPS = 1e-12  # zero-norm rows stay zero instead of becoming NaN


def _check_width(scorer: Scorer, data: FeatureSet, width: int) -> None:
    if data.feature.shape[1] != width:
        raise ValueError(
            f"scorer {scorer.name!r}: feature width {data.feature.shape[1]} differs from "
            f"the train dump's {width}"
        )


class Mahalanobis(Scorer):
    name = "mahalanobis"
    needs = ("feature",)
    fits = True
    summary = (
        "-min over classes of the squared Mahalanobis distance to the class means, "
        "one tied covariance, pinv (Lee et al., NeurIPS 2018)"
    )

    def _fit(self, train: FeatureSet) -> None:
        features = train.feature
        # Distances are shift invariant; centring on the train mean keeps the
        # expanded quadratic form below free of large cancelling terms.
        self._center = features.mean(axis=0, dtype=np.float64)
        order = np.argsort(train.label, kind="stable")
        classes, starts, counts = np.unique(
            train.label[order], return_index=True, return_counts=True
        )
        dim = features.shape[1]
        means = np.empty((len(classes), dim))
        scatter = np.zeros((dim, dim))
        for i, (start, count) in enumerate(zip(starts, counts, strict=True)):
            rows = features[order[start : start + count]].astype(np.float64) - self._center
            means[i] = rows.mean(axis=0)
            rows -= means[i]
            scatter += rows.T @ rows
        # Pooled within-class covariance: sum over classes / N (Lee et al. 2018).
        cov = scatter / len(features)
        cov = (cov + cov.T) / 2  # exact symmetry for the hermitian pinv
        precision = np.linalg.pinv(cov, hermitian=True)
        self.classes_ = classes
        self.means_ = means  # relative to self._center
        self.precision_ = precision
        # (x-m)^T P (x-m) = x^T P x - 2 x^T (P m) + m^T P m, per class m.
        self._means_p = means @ precision
        self._means_term = np.einsum("cd,cd->c", self._means_p, means)

    def _score(self, data: FeatureSet) -> np.ndarray:
        _check_width(self, data, len(self._center))
        out = np.empty(len(data))
        for start in range(0, len(data), BATCH):
            x = data.feature[start : start + BATCH].astype(np.float64) - self._center
            quad = np.einsum("nd,nd->n", x @ self.precision_, x)
            dist = quad[:, None] - 2.0 * (x @ self._means_p.T) + self._means_term[None, :]
            # Rounding can push a distance just below zero; it is >= 0 in exact arithmetic.
            out[start : start + len(x)] = -np.maximum(dist.min(axis=1), 0.0)
        return out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalize in float64 blocks; return C-contiguous float32 for faiss."""
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), BATCH):
        block = np.asarray(x[start : start + BATCH], dtype=np.float64)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block / np.maximum(norms, NORM_EPS)
    return out


class KNN(Scorer):
    name = "knn"
    needs = ("feature",)
    fits = True
    defaults = {"k": 50}
    params_help = {"k": "rank of the train neighbour whose distance is used, >= 1"}
    summary = (
        "-(Euclidean distance to the k-th nearest train feature), features L2-normalized, "
        "exact search (Sun et al., ICML 2022)"
    )

    def check_params(self) -> None:
        self._require_int("k", 1)

    def _fit(self, train: FeatureSet) -> None:
        import faiss  # heavy; only scorers that search pay for it

        k = self.params["k"]
        n, dim = train.feature.shape
        if k > n:
            raise ValueError(f"scorer 'knn': k={k} exceeds the train bank size {n}")
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        index = faiss.IndexFlatL2(dim)
        if faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(_l2_normalize(train.feature))
        self._index = index
        self._dim = dim

    def _score(self, data: FeatureSet) -> np.ndarray:
        _check_width(self, data, self._dim)
        k = self.params["k"]
        out = np.empty(len(data))
        for start in range(0, len(data), BATCH):
            queries = _l2_normalize(data.feature[start : start + BATCH])
            sq_dist, _ = self._index.search(queries, k)
            # faiss returns squared L2, which can round slightly below zero.
            kth = np.maximum(sq_dist[:, k - 1].astype(np.float64), 0.0)
            out[start : start + len(queries)] = -np.sqrt(kth)
        return out
