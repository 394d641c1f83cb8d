"""Metrics against values worked out by hand (the work is in the comments)."""

import math

import numpy as np
import pytest

from ood.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_95_tpr,
    ood_metrics,
)

# Case A: ID = [0.9, 0.8, 0.7, 0.6], OOD = [0.65, 0.5, 0.4, 0.3]
ID_A = [0.9, 0.8, 0.7, 0.6]
OOD_A = [0.65, 0.5, 0.4, 0.3]


def test_case_a_auroc_by_counting_pairs():
    # 16 (ID, OOD) pairs; ID wins: 0.9 -> 4, 0.8 -> 4, 0.7 -> 4, 0.6 -> 3 (loses to 0.65).
    # AUROC = 15 / 16
    assert auroc(ID_A, OOD_A) == pytest.approx(15 / 16)


def test_case_a_fpr95():
    # 95% of 4 ID needs all 4 accepted -> threshold 0.6; OOD >= 0.6: {0.65} -> 1/4.
    assert fpr_at_95_tpr(ID_A, OOD_A) == pytest.approx(0.25)
    # tpr = 0.5: 2 ID accepted -> threshold 0.8; no OOD >= 0.8.
    assert fpr_at_95_tpr(ID_A, OOD_A, tpr=0.5) == 0.0
    # tpr = 1.0 is the same threshold as 0.95 here.
    assert fpr_at_95_tpr(ID_A, OOD_A, tpr=1.0) == pytest.approx(0.25)


def test_case_a_aupr():
    # Ranked by score: 0.9 I, 0.8 I, 0.7 I, 0.65 O, 0.6 I, 0.5 O, 0.4 O, 0.3 O.
    # ID hits at ranks 1, 2, 3, 5: precisions 1, 1, 1, 4/5 -> AP_in = 3.8 / 4 = 0.95.
    assert aupr_in(ID_A, OOD_A) == pytest.approx(0.95)
    # Ranked by -score: 0.3 O, 0.4 O, 0.5 O, 0.6 I, 0.65 O, ...
    # OOD hits at ranks 1, 2, 3, 5 -> AP_out = (1 + 1 + 1 + 4/5) / 4 = 0.95.
    assert aupr_out(ID_A, OOD_A) == pytest.approx(0.95)


def test_asymmetric_aupr_case():
    # ID = [3, 1], OOD = [2, 0, -1].
    # By score: 3 I, 2 O, 1 I, 0 O, -1 O. ID hits at ranks 1, 3: (1 + 2/3) / 2 = 5/6.
    # By -score: -1 O, 0 O, 1 I, 2 O, 3 I. OOD hits at ranks 1, 2, 4: (1 + 1 + 3/4) / 3 = 11/12.
    # AUROC: 3 beats 3 OOD, 1 beats 2 (0, -1) -> 5/6.
    # FPR95: both ID needed -> threshold 1; OOD >= 1: {2} -> 1/3.
    ids, oods = [3.0, 1.0], [2.0, 0.0, -1.0]
    assert aupr_in(ids, oods) == pytest.approx(5 / 6)
    assert aupr_out(ids, oods) == pytest.approx(11 / 12)
    assert auroc(ids, oods) == pytest.approx(5 / 6)
    assert fpr_at_95_tpr(ids, oods) == pytest.approx(1 / 3)


def test_aupr_with_a_tie():
    # ID = [2, 1], OOD = [1, 0]; the tie at 1 is one threshold.
    # score >= 2: TP 1, FP 0 -> P 1, R 1/2; score >= 1: TP 2, FP 1 -> P 2/3, R 1.
    # AP = sum (R_n - R_n-1) P_n = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert aupr_in([2.0, 1.0], [1.0, 0.0]) == pytest.approx(5 / 6)
    # AUROC: pairs (2,1) win, (2,0) win, (1,1) tie = 1/2, (1,0) win -> 3.5 / 4.
    assert auroc([2.0, 1.0], [1.0, 0.0]) == pytest.approx(3.5 / 4)


def test_fpr95_single_tie_at_threshold():
    # ID = 1, 2, ..., 20; 95% of 20 = 19 accepted -> threshold 2.
    # OOD = [10.5, 1.5, 0.5, 2.0]: accepted if >= 2 -> 10.5 and the tied 2.0 -> 2/4.
    ids = np.arange(1, 21, dtype=float)
    oods = [10.5, 1.5, 0.5, 2.0]
    assert fpr_at_95_tpr(ids, oods) == pytest.approx(0.5)
    # AUROC by pairs (80): 10.5 loses to 11..20 -> 10; 1.5 -> 19; 0.5 -> 20;
    # 2.0 -> 18 wins (3..20) + 1/2 tie -> 18.5. Sum 67.5 / 80.
    assert auroc(ids, oods) == pytest.approx(67.5 / 80)


def test_fpr95_many_ties_at_threshold():
    # ID: 18 at 2.0, 2 at 1.0; OOD: 5 at 1.0, 5 at 0.0.
    # Threshold 2.0 accepts 18/20 = 0.90 < 0.95, so the threshold is 1.0, which
    # accepts all 20 ID and all 5 tied OOD -> FPR 5/10.
    ids = [2.0] * 18 + [1.0] * 2
    oods = [1.0] * 5 + [0.0] * 5
    assert fpr_at_95_tpr(ids, oods) == pytest.approx(0.5)


def test_all_tied():
    # Every pair ties -> AUROC 1/2; only threshold accepts everything -> FPR 1.
    assert auroc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert fpr_at_95_tpr([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_perfect_separation():
    m = ood_metrics([3.0, 4.0], [1.0, 2.0])
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    assert all(type(v) is float for v in m.values())


def test_fully_reversed():
    # Every OOD above every ID: no pair won; accepting both ID accepts both OOD.
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert fpr_at_95_tpr([1.0, 2.0], [3.0, 4.0]) == 1.0


def test_auroc_symmetry():
    rng = np.random.default_rng(0)
    ids, oods = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 70)
    assert auroc(ids, oods) == pytest.approx(1.0 - auroc(oods, ids))
    assert auroc(ids, oods) == pytest.approx(auroc(-oods, -ids))


def test_ood_metrics_keys():
    assert set(ood_metrics(ID_A, OOD_A)) == {"auroc", "fpr95", "aupr_in", "aupr_out"}


@pytest.mark.parametrize(
    ("ids", "oods", "match"),
    [
        ([], [1.0], "ID scores are empty"),
        ([1.0], [], "OOD scores are empty"),
        ([1.0, math.nan], [1.0], "ID scores contain 1 NaN or infinite"),
        ([1.0], [math.inf, 0.0, -math.inf], "OOD scores contain 2 NaN or infinite"),
        ([[1.0, 2.0]], [1.0], "ID scores must be 1-D"),
    ],
)
def test_bad_inputs(ids, oods, match):
    for fn in (auroc, fpr_at_95_tpr, aupr_in, aupr_out, ood_metrics):
        with pytest.raises(ValueError, match=match):
            fn(ids, oods)


def test_bad_tpr():
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_95_tpr(ID_A, OOD_A, tpr=0.0)


def test_accuracy():
    # argmax rows: 0, 1, 0 vs labels 0, 1, 1 -> 2 / 3.
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert type(accuracy(logits, [0, 1, 0])) is float


def test_accuracy_errors():
    with pytest.raises(ValueError, match="non-empty"):
        accuracy(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match="1 negative label"):
        accuracy(np.zeros((2, 3)), [0, -1])
    with pytest.raises(ValueError, match="logits of shape"):
        accuracy(np.zeros((3, 3)), [0, 1])
