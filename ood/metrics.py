"""OOD detection metrics on score arrays (DESIGN.md, "Contracts").

Scores follow the package convention: higher = more in-distribution. Where a
metric needs a positive class it is stated in its docstring; ties are handled
the way scikit-learn's curves handle them (equal scores share one threshold).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _check(scores, side: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{side} scores must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{side} scores are empty")
    bad = int(np.sum(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{side} scores contain {bad} NaN or infinite value(s)")
    return values


def _labelled(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate both sides; y = 1 for ID, 0 for OOD."""
    id_s = _check(id_scores, "ID")
    ood_s = _check(ood_scores, "OOD")
    y = np.concatenate([np.ones(id_s.size, dtype=np.int64), np.zeros(ood_s.size, dtype=np.int64)])
    return y, np.concatenate([id_s, ood_s])


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve with ID as label 1 and the score as is.

    Equals the OOD-positive AUROC on -score, and P(score_id > score_ood) with
    ties counted 1/2.
    """
    y, s = _labelled(id_scores, ood_scores)
    return float(roc_auc_score(y, s))


def fpr_at_95_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted as ID (score >= threshold) at the
    threshold that accepts a fraction `tpr` of the ID samples.

    Exactly: the false positive rate at the first point of
    `sklearn.metrics.roc_curve(y, score, drop_intermediate=False)` (ID = 1)
    whose true positive rate is >= `tpr`. FPR is non-decreasing along the
    curve, so this is the smallest FPR reaching that TPR. Equal scores form a
    single threshold in scikit-learn, so OOD samples tied with the ID sample
    at the threshold are all accepted.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    y, s = _labelled(id_scores, ood_scores)
    fpr_curve, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    # The last point has tpr == 1, so a point with tpr_curve >= tpr always exists.
    return float(fpr_curve[np.argmax(tpr_curve >= tpr)])


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class, ranked by score."""
    y, s = _labelled(id_scores, ood_scores)
    return float(average_precision_score(y, s))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class, ranked by -score."""
    y, s = _labelled(id_scores, ood_scores)
    return float(average_precision_score(1 - y, -s))


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """All contract metrics: auroc, fpr95, aupr_in, aupr_out (python floats)."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_95_tpr(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of argmax(logits) against integer labels (all rows count)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"accuracy needs a non-empty 1-D label array, got shape {labels.shape}")
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(
            f"accuracy needs logits of shape (N, C) with N = {len(labels)} labels, "
            f"got {logits.shape}"
        )
    if np.any(labels < 0):
        raise ValueError(
            f"accuracy needs ID class labels >= 0; got {int(np.sum(labels < 0))} negative "
            "label(s) (OOD rows have label -1 and have no accuracy)"
        )
    return float(np.mean(np.argmax(logits, axis=1) == labels))
