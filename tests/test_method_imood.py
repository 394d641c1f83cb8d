"""ImOOD (imood): each loss term against a hand computation with a skewed class
prior, the uniform-prior limit, where the gradients go (bias, projector, and
the outliers through the regulariser and the contrastive term), and the real
loop on a long-tailed tiny dataset: the prior it uses, determinism, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train import BACKBONE, assert_same_weights, train_into
from torch.nn import functional as F

from ood.models.backbones import features_and_logits
from ood.train import get_objective
from ood.train.imood import (
    ImbalancedOOD,
    adjusted_cross_entropy,
    discriminator_loss,
    partial_asymmetric_supcon,
    prior_adjusted_score,
    tail_classes,
)
from ood.train.loop import TrainSettings
from ood.train.objective import Batch, TrainContext
from ood.train.supcon import supcon_from_logits

SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 0.02, "crop_padding": 2, "hflip": True}
COUNTS = [50.0, 20.0, 5.0]  # a skewed prior: pi = (2/3, 4/15, 1/15); class 2 is the tail
LT_TRAIN = [6, 3, 1]  # train images per class of the long-tailed tiny digits


@pytest.fixture(scope="module")
def lt_digits(tmp_path_factory):
    """Digits 0, 1, 2 with 6 / 3 / 1 train images (the first of each class), all test rows."""
    from ood.data.curate import curate
    from ood.data.manifest import load_images, write_dataset

    root = tmp_path_factory.mktemp("lt_data")
    spec = {
        "source": "sklearn_digits",
        "params": {"classes": [0, 1, 2], "max_per_class": 12, "train_fraction": 0.5},
    }
    curate("digits", spec, root / "digits")
    records = []
    for split in ("train", "test"):
        images, labels, _ = load_images(root / "digits", split=split)
        kept = dict.fromkeys(range(3), 0)
        for image, label in zip(images, labels.tolist(), strict=True):
            if split == "test" or kept[label] < LT_TRAIN[label]:
                kept[label] += 1
                records.append((split, label, image))
    write_dataset(root / "lt_digits", records, info='{"long_tailed": [6, 3, 1]}')
    return root / "lt_digits"


def run(dataset, out, *, outliers, stop_after_epoch=None, resume=True, epochs=2, **params):
    settings = TrainSettings.from_dict({**SETTINGS, "epochs": epochs, "method_params": params})
    return train_into(
        dataset,
        out,
        "imood",
        settings,
        resume_dir=out / "resume" if resume else None,
        outliers_dir=outliers,
        stop_after_epoch=stop_after_epoch,
    )


def skewed_context():
    return TrainContext(num_classes=3, class_counts=torch.tensor(COUNTS), input_size=32)


def tiny_model(num_classes=3):
    from ood.models.backbones import build_model

    torch.manual_seed(0)
    return build_model(BACKBONE, num_classes)


# --- hand computations --------------------------------------------------------------------


def softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def log_sum_exp(row):
    return math.log(sum(math.exp(v) for v in row))


def test_adjusted_cross_entropy_equals_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0])
    pi = np.array(COUNTS) / sum(COUNTS)
    got = adjusted_cross_entropy(logits, labels, torch.tensor(np.log(pi)), tau=0.8)
    expected = np.mean(
        [
            log_sum_exp([row[c] + 0.8 * math.log(pi[c]) for c in range(3)])
            - (row[y] + 0.8 * math.log(pi[y]))
            for row, y in zip(logits.numpy(), labels.tolist(), strict=True)
        ]
    )
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # The prior enters: it differs from plain CE on the same logits.
    assert abs(float(got) - float(F.cross_entropy(logits, labels))) > 1e-3


def test_prior_adjusted_score_and_bce_equal_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(7, 3, dtype=torch.float64) * 2
    pi = np.array(COUNTS) / sum(COUNTS)
    got = prior_adjusted_score(logits, torch.tensor(np.log(pi))).numpy()
    for k, row in enumerate(logits.numpy()):
        beta = np.mean([softmax(row)[c] / pi[c] for c in range(3)])
        assert got[k] == pytest.approx(log_sum_exp(row) + math.log(beta), rel=1e-12)
        # Equivalently the energy of the prior-removed logits, minus log C.
        assert got[k] == pytest.approx(math.log(np.mean(np.exp(row) / pi)), rel=1e-12)
    bias = -0.3
    inside, outside = got[:4] + bias, got[4:] + bias

    def sigmoid(v):
        return 1.0 / (1.0 + math.exp(-v))

    expected = -np.mean([math.log(sigmoid(v)) for v in inside]) - np.mean(
        [math.log(1.0 - sigmoid(v)) for v in outside]
    )
    loss = discriminator_loss(torch.tensor(inside), torch.tensor(outside))
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_partial_asymmetric_supcon_equals_per_anchor_loop():
    torch.manual_seed(2)
    n_out = 3
    labels = torch.tensor([0, 2, 1, 2, 0, 2, 1, 2])  # two views of 4 images
    z = F.normalize(torch.randn(len(labels) + n_out, 5, dtype=torch.float64), dim=1)
    tail = torch.tensor([False, True, True])
    t = 0.3
    got = float(partial_asymmetric_supcon(z, labels, tail, n_out, t))
    zs, ys = z.numpy(), labels.tolist()
    n = len(zs)
    per_anchor = []
    for i in range(len(ys)):
        if not tail[ys[i]]:
            continue  # head-class rows are not anchors; outliers (i >= 8) never are
        others = [a for a in range(n) if a != i]  # outliers included
        denominator = sum(math.exp(zs[i] @ zs[a] / t) for a in others)
        positives = [p for p in range(len(ys)) if p != i and ys[p] == ys[i]]  # ID rows only
        per_anchor.append(
            -np.mean([math.log(math.exp(zs[i] @ zs[p] / t) / denominator) for p in positives])
        )
    assert len(per_anchor) == 6
    assert got == pytest.approx(np.mean(per_anchor), rel=1e-12)
    # No tail image in the batch: the term is 0 and moves nothing.
    z_head = z.clone().requires_grad_(True)
    head_only = partial_asymmetric_supcon(z_head, torch.tensor([0, 0, 0, 0]), tail, 7, t)
    head_only.backward()
    assert float(head_only.detach()) == 0.0 and not z_head.grad.any()


def test_supcon_anchor_mask_keeps_the_full_loss():
    torch.manual_seed(3)
    z = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    sims = z @ z.T / 0.5
    everyone = torch.ones(6, dtype=torch.bool)
    assert float(supcon_from_logits(sims, labels, everyone)) == pytest.approx(
        float(supcon_from_logits(sims, labels)), rel=1e-14
    )
    with pytest.raises(ValueError, match="no anchors"):
        supcon_from_logits(sims, labels, torch.zeros(6, dtype=torch.bool))


def test_tail_classes_follow_pascl_rule():
    # CIFAR-10-LT order (counts fall with the index): k = 0.4 -> classes 6..9.
    counts = torch.tensor([5000.0 * 0.01 ** (c / 9) for c in range(10)])
    assert tail_classes(counts, 0.4).nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert int(tail_classes(torch.ones(100), 0.4).sum()) == 40  # ties: the higher indices
    assert tail_classes(torch.ones(100), 0.4).nonzero().flatten().tolist() == list(range(60, 100))
    # By counts, not by index; 3 classes at k = 0.4: one tail class.
    assert tail_classes(torch.tensor([3.0, 1.0, 7.0]), 0.4).tolist() == [False, True, False]
    # PASCL's `label >= round((1 - k) C)` with Python's rounding: C = 5, k = 0.3 -> class 4 only.
    assert tail_classes(torch.arange(5, 0, -1.0), 0.3).tolist() == [False] * 4 + [True]
    assert not tail_classes(torch.tensor(COUNTS), 0.0).any()
    assert tail_classes(torch.tensor(COUNTS), 1.0).all()


def test_objective_equals_its_terms_by_hand():
    model = tiny_model().double()
    objective = get_objective("imood", {"logit_adjust": 0.7, "temperature": 0.2})
    heads = objective.setup(model, skewed_context())
    heads.double()
    with torch.no_grad():
        heads.bias.fill_(0.4)
    assert objective.tail.tolist() == [False, False, True]
    torch.manual_seed(4)
    views = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    outliers = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    model.train()
    loss, logits = objective.loss(model, Batch(views, labels, outliers))

    with torch.no_grad():
        feature, z = features_and_logits(model, torch.cat([*views, outliers]))
        u = F.normalize(heads.projector(feature), dim=1).numpy()
    z = z.numpy()
    pi = np.array(COUNTS) / sum(COUNTS)
    ys = labels.tolist() * 2
    ce = np.mean(
        [
            log_sum_exp(z[i] + 0.7 * np.log(pi)) - z[i, y] - 0.7 * np.log(pi[y])
            for i, y in enumerate(ys)
        ]
    )
    s = [log_sum_exp(row) + math.log(np.mean(softmax(row) / pi)) + 0.4 for row in z]
    bce = np.mean([math.log(1 + math.exp(-v)) for v in s[:8]]) + np.mean(
        [math.log(1 + math.exp(v)) for v in s[8:]]
    )
    per_anchor = []
    for i in [1, 3, 5, 7]:  # the class-2 (tail) rows of both views
        denominator = sum(math.exp(u[i] @ u[a] / 0.2) for a in range(13) if a != i)
        positives = [p for p in range(8) if p != i and ys[p] == 2]
        per_anchor.append(-np.mean([u[i] @ u[p] / 0.2 - math.log(denominator) for p in positives]))
    expected = ce + 0.5 * bce + 0.05 * np.mean(per_anchor)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    # The unadjusted logits of the first view are what the loop scores.
    np.testing.assert_allclose(logits.detach().numpy(), z[:4], rtol=1e-12)


def test_uniform_prior_gives_plain_ce_and_beta_one():
    torch.manual_seed(5)
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    objective = get_objective("imood")
    objective.setup(tiny_model(4), TrainContext.uniform(4, per_class=7))
    log_prior = objective.log_prior.double()
    np.testing.assert_allclose(log_prior.numpy(), np.log(np.full(4, 0.25)), rtol=1e-6)
    plain = F.cross_entropy(logits, labels)
    assert float(adjusted_cross_entropy(logits, labels, log_prior, 1.0)) == pytest.approx(
        float(plain), rel=1e-7
    )
    # log beta = 0: the adjusted score is the energy.
    np.testing.assert_allclose(
        prior_adjusted_score(logits, log_prior).numpy(),
        torch.logsumexp(logits, 1).numpy(),
        rtol=1e-7,
    )
    # A skewed prior moves both.
    skewed = get_objective("imood")
    skewed.setup(tiny_model(3), skewed_context())
    three = logits[:, :3]
    assert (
        abs(
            float(adjusted_cross_entropy(three, labels % 3, skewed.log_prior.double(), 1.0))
            - float(F.cross_entropy(three, labels % 3))
        )
        > 1e-3
    )
    assert (
        prior_adjusted_score(three, skewed.log_prior.double()) - torch.logsumexp(three, 1)
    ).abs().min() > 1e-3


def test_parameters_and_prior_are_checked():
    for params, message in [
        ({"tail_fraction": 1.5}, "'tail_fraction' must be in"),
        ({"temperature": 0}, "'temperature' must be > 0"),
        ({"feature_dim": 2.5}, "'feature_dim' must be a positive integer"),
        ({"lam": 1}, r"unknown parameter\(s\) lam"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_objective("imood", params)
    context = TrainContext(num_classes=3, class_counts=torch.tensor([4.0, 0.0, 1.0]), input_size=32)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no train images"):
        get_objective("imood").setup(tiny_model(), context)
    assert ImbalancedOOD.outliers and ImbalancedOOD.views == 2
    with pytest.raises(ValueError, match="no outliers"):
        objective = get_objective("imood")
        objective.setup(tiny_model(), skewed_context())
        objective.loss(tiny_model(), Batch([torch.randn(2, 3, 32, 32)] * 2, torch.tensor([0, 1])))


# --- gradients --------------------------------------------------------------------------


def outlier_gradient(model, heads, views, labels, outliers, **params):
    """Gradients after one loss of `params` (sharing `heads`): outlier images, bias, projector."""
    objective = get_objective("imood", params)
    objective.setup(model, skewed_context())
    objective.extra = heads
    model.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    images = outliers.clone().requires_grad_(True)
    objective.loss(model, Batch(views, labels, images))[0].backward()
    return images.grad, heads.bias.grad, heads.projector[0].weight.grad, model.conv1.weight.grad


def nonzero(grad):
    return grad is not None and bool(grad.abs().sum() > 0)


def test_where_the_gradients_go():
    model = tiny_model()
    heads = get_objective("imood").setup(model, skewed_context())
    torch.manual_seed(6)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    outliers = torch.randn(6, 3, 32, 32)
    with_tail, head_only = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 0, 1])
    # Eval mode: batch norm's running statistics, so outliers reach the loss only
    # through their own rows (in train mode the batch statistics mix them into CE).
    model.eval()

    images, bias, projector, backbone = outlier_gradient(model, heads, views, with_tail, outliers)
    assert nonzero(images) and nonzero(bias) and nonzero(projector) and nonzero(backbone)

    # Regulariser alone: the outliers' gradient comes through the backbone; no projector.
    images, bias, projector, _ = outlier_gradient(
        model, heads, views, with_tail, outliers, pascl_weight=0.0
    )
    assert nonzero(images) and nonzero(bias) and not nonzero(projector)

    # Contrastive term alone: outliers are pushed away from the tail anchors; b unused.
    images, bias, projector, _ = outlier_gradient(
        model, heads, views, with_tail, outliers, reg_weight=0.0
    )
    assert nonzero(images) and nonzero(projector) and not nonzero(bias)

    # Neither term, or the contrastive term without a tail image: nothing reaches the outliers.
    images, _, _, backbone = outlier_gradient(
        model, heads, views, with_tail, outliers, reg_weight=0.0, pascl_weight=0.0
    )
    assert not nonzero(images) and nonzero(backbone)
    images, _, projector, _ = outlier_gradient(
        model, heads, views, head_only, outliers, reg_weight=0.0
    )
    assert not nonzero(images) and not nonzero(projector)


# --- the real loop on long-tailed data ----------------------------------------------------


def test_prior_in_the_loop_is_the_train_counts(lt_digits, noise_outliers, tmp_path, monkeypatch):
    seen = []
    original = ImbalancedOOD.setup

    def spy(self, model, context):
        seen.append(self)
        return original(self, model, context)

    monkeypatch.setattr(ImbalancedOOD, "setup", spy)
    meta = run(lt_digits, tmp_path, outliers=noise_outliers, resume=False, epochs=1)
    (objective,) = seen
    expected = np.array(LT_TRAIN) / sum(LT_TRAIN)
    np.testing.assert_allclose(objective.prior.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(objective.log_prior.exp().numpy(), expected, rtol=1e-6)
    assert objective.tail.tolist() == [False, False, True]
    assert meta["n_train"] == sum(LT_TRAIN) and meta["n_outliers"] == 20


def test_same_seed_identical_and_resume_equals_uninterrupted(lt_digits, noise_outliers, tmp_path):
    first, second, resumed = (tmp_path / name for name in ("a", "b", "r"))
    run(lt_digits, first, outliers=noise_outliers)
    run(lt_digits, second, outliers=noise_outliers)
    assert_same_weights(first / "model.pt", second / "model.pt")
    with pytest.raises(KeyboardInterrupt):
        run(lt_digits, resumed, outliers=noise_outliers, stop_after_epoch=1)
    assert (resumed / "resume/last.pt").exists() and not (resumed / "model.pt").exists()
    run(lt_digits, resumed, outliers=noise_outliers)
    assert_same_weights(first / "model.pt", resumed / "model.pt")
    assert (first / "train_log.csv").read_text().count("\n") == 1 + SETTINGS["epochs"]
    # The projector and b trained and resumed too, but the checkpoint is the classifier only.
    keys = set(torch.load(first / "model.pt", weights_only=True)["model"])
    assert keys == set(tiny_model().state_dict())
