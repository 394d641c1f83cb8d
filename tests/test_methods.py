"""Training methods beyond ce: each objective against a hand computation on a tiny
batch, where its gradients go, and the shared loop's determinism and resume
with two views (supcon) and with an outlier stream (oe)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import BACKBONE, assert_same_weights, state_dict, train_into
from torch import nn
from torch.nn import functional as F

from ood.cli import main
from ood.train import METHOD_OUTLIERS, METHOD_TEACHER, METHODS, get_objective, objective_class
from ood.train.loop import TrainSettings
from ood.train.mode import alpa_similarity
from ood.train.objective import Batch, TrainContext
from ood.train.oe import uniform_cross_entropy
from ood.train.supcon import supcon_from_logits, supcon_loss

SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 0.02, "crop_padding": 2, "hflip": True}


def run(dataset, out, method, *, outliers=None, stop_after_epoch=None, resume=True, **params):
    settings = TrainSettings.from_dict({**SETTINGS, "method_params": params})
    return train_into(
        dataset,
        out,
        method,
        settings,
        resume_dir=out / "resume" if resume else None,
        outliers_dir=outliers,
        stop_after_epoch=stop_after_epoch,
    )


# --- registry ---------------------------------------------------------------------------


def test_registry_agrees_with_the_objectives(capsys):
    for name in METHODS:
        cls = objective_class(name)
        assert cls.name == name
        assert cls.outliers == (name in METHOD_OUTLIERS), name
        assert cls.needs_teacher == (name in METHOD_TEACHER), name
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}: " in "\n" + out
    assert "temperature=0.1, feature_dim=128, ce_weight=1.0" in out
    assert "outliers: auxiliary outlier set" in out


def test_parse_time_parameter_names_are_the_objectives():
    from ood.train import METHOD_PARAMS

    assert set(METHOD_PARAMS) == set(METHODS)
    for name in METHODS:
        assert METHOD_PARAMS[name] == tuple(objective_class(name).defaults), name


def test_readme_methods_table_is_the_registry():
    from ood.train.methods import describe_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe_markdown() in readme, "README: paste `ood methods --markdown`"


def test_parameters_are_checked():
    with pytest.raises(ValueError, match=r"method 'oe': unknown parameter\(s\) lam; known: weight"):
        get_objective("oe", {"lam": 1.0})
    with pytest.raises(ValueError, match="method 'supcon': parameter 'temperature' must be"):
        get_objective("supcon", {"temperature": "hot"})


# --- supcon -----------------------------------------------------------------------------


def test_supcon_loss_equals_hand_computation():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    t = 0.5
    got = float(supcon_loss(z, labels, t))
    # Loop over anchors and positives, straight from the definition.
    zs = z.numpy()
    total = 0.0
    for i in range(6):
        others = [a for a in range(6) if a != i]
        denominator = sum(math.exp(zs[i] @ zs[a] / t) for a in others)
        positives = [p for p in others if labels[p] == labels[i]]
        total += -sum(math.log(math.exp(zs[i] @ zs[p] / t) / denominator) for p in positives) / len(
            positives
        )
    assert got == pytest.approx(total / 6, rel=1e-12)


def test_supcon_needs_a_positive_per_anchor():
    z = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="an anchor has no positive"):
        supcon_loss(z, torch.tensor([0, 1, 1]), 0.1)


def tiny_model(num_classes=3):
    from ood.models.backbones import build_model

    torch.manual_seed(0)
    return build_model(BACKBONE, num_classes)


def test_supcon_objective_and_where_its_gradients_go():
    model = tiny_model()
    objective = get_objective("supcon", {"temperature": 0.2})
    projector = objective.setup(model, TrainContext.uniform(3))
    torch.manual_seed(2)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    loss, logits = objective.loss(model, Batch(views, labels))

    # The same numbers by hand: projections of both views, SupCon, and CE of the probe.
    from ood.models.backbones import features_and_logits

    feature, _ = features_and_logits(model, torch.cat(views))
    z = F.normalize(projector(feature), dim=1)
    probe = model.get_classifier()(feature[:4])
    expected = supcon_loss(z, labels.repeat(2), 0.2) + F.cross_entropy(probe, labels)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    np.testing.assert_allclose(logits.detach(), probe.detach(), rtol=1e-5, atol=1e-6)

    loss.backward()
    backbone_grad = model.conv1.weight.grad.clone()
    assert projector[0].weight.grad.abs().sum() > 0
    assert model.get_classifier().weight.grad.abs().sum() > 0
    # The probe's CE does not reach the backbone: without it the backbone gradient is the same.
    model.zero_grad()
    contrastive_only = get_objective("supcon", {"temperature": 0.2, "ce_weight": 0.0})
    contrastive_only.extra = projector
    contrastive_only.loss(model, Batch(views, labels))[0].backward()
    torch.testing.assert_close(model.conv1.weight.grad, backbone_grad)
    assert (
        model.get_classifier().weight.grad is None or not model.get_classifier().weight.grad.any()
    )


# --- mode_t / mode_f (ALPA) -------------------------------------------------------------


def test_alpa_similarity_equals_hand_computation():
    torch.manual_seed(3)
    n, p, w = 3, 4, 5
    q, k, v = (torch.randn(n, p, w, dtype=torch.float64) for _ in range(3))
    got = alpa_similarity(q, k, v).numpy()
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    for i in range(n):
        for j in range(n):
            cosines = []
            for a in range(p):
                scores = np.array([qn[i, a] @ kn[j, b] / math.sqrt(w) for b in range(p)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                carried = sum(weights[b] * vn[j, b] for b in range(p))
                own = vn[i, a]
                cosines.append(own @ carried / np.linalg.norm(own) / np.linalg.norm(carried))
            assert got[i, j] == pytest.approx(np.mean(cosines), rel=1e-10), (i, j)


def test_mode_t_loss_and_where_its_gradients_go():
    model = tiny_model()
    objective = get_objective("mode_t", {"alpa_weight": 0.5})
    heads = objective.setup(model, TrainContext.uniform(3))
    assert set(heads) == {"query", "key", "value", "projector"}
    torch.manual_seed(4)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    loss, logits = objective.loss(model, Batch(views, labels))

    feature_map = model.forward_features(torch.cat(views))
    feature = model.forward_head(feature_map, pre_logits=True)
    local = feature_map.flatten(2).transpose(1, 2)
    q, k, v = (heads[name](local) for name in ("query", "key", "value"))
    both = labels.repeat(2)
    alpa = supcon_from_logits(10.0 * alpa_similarity(q, k, v), both)
    contrastive = supcon_loss(F.normalize(heads["projector"](feature), dim=1), both, 0.1)
    probe = F.cross_entropy(model.get_classifier()(feature[:4]), labels)
    expected = 0.5 * alpa + contrastive + probe
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert logits.shape == (4, 3)

    loss.backward()
    for name in ("query", "key", "value", "projector"):
        assert heads[name][0].weight.grad.abs().sum() > 0, name
    assert model.conv1.weight.grad.abs().sum() > 0


def test_alpa_alone_moves_the_backbone_and_mode_f_has_no_projector():
    model = tiny_model()
    objective = get_objective("mode_f", {"ce_weight": 0.0})
    heads = objective.setup(model, TrainContext.uniform(3))
    assert set(heads) == {"query", "key", "value"}
    torch.manual_seed(5)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = objective.loss(model, Batch(views, torch.tensor([0, 0, 1, 1])))
    loss.backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert heads["query"][0].weight.grad.abs().sum() > 0


# --- oe ---------------------------------------------------------------------------------


def test_oe_loss_equals_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4)).double()
    images = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    outliers = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    loss, logits = get_objective("oe", {"weight": 0.7}).loss(
        model, Batch([images], labels, outliers)
    )
    w = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    zi = images.numpy().reshape(3, -1) @ w.T + b
    zo = outliers.numpy().reshape(5, -1) @ w.T + b
    ce = np.mean(
        [math.log(np.exp(row).sum()) - row[y] for row, y in zip(zi, labels.numpy(), strict=True)]
    )
    # CE to uniform: -(1/C) sum_c log softmax_c = logsumexp - mean logit.
    to_uniform = np.mean([-np.mean(row - math.log(np.exp(row).sum())) for row in zo])
    assert float(loss.detach()) == pytest.approx(ce + 0.7 * to_uniform, rel=1e-12)
    np.testing.assert_allclose(logits.detach().numpy(), zi, rtol=1e-12)


def test_oe_outlier_term_reaches_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    images, labels = torch.randn(3, 3, 2, 2), torch.tensor([0, 3, 1])
    outliers = torch.randn(5, 3, 2, 2)
    grads = []
    for weight in (0.0, 1.0):
        model.zero_grad()
        get_objective("oe", {"weight": weight}).loss(model, Batch([images], labels, outliers))[
            0
        ].backward()
        grads.append(model[1].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    # CE to uniform is at least log C, reached when the softmax is uniform (equal logits).
    assert float(uniform_cross_entropy(torch.zeros(2, 4))) == pytest.approx(math.log(4))
    assert float(uniform_cross_entropy(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))) > math.log(4)


def test_oe_without_outliers_and_ce_with_outliers_are_errors(tiny_digits, noise_outliers, tmp_path):
    with pytest.raises(ValueError, match="method 'oe' trains on an auxiliary outlier set"):
        run(tiny_digits, tmp_path, "oe", resume=False)
    with pytest.raises(ValueError, match=r"method 'ce' takes no outlier set \(got .*noise\)"):
        run(tiny_digits, tmp_path, "ce", outliers=noise_outliers, resume=False)
    assert not (tmp_path / "model.pt").exists()


# --- the shared loop with views and outliers --------------------------------------------


GROUPS = {"groups": [[0, 2], [1]]}  # tiny_digits has classes 0, 1, 2


@pytest.mark.parametrize(
    ("method", "params"), [("supcon", {}), ("mode_t", {}), ("oe", {}), ("mos", GROUPS)]
)
def test_same_seed_identical_and_resume_equals_uninterrupted(
    method, params, tiny_digits, noise_outliers, tmp_path
):
    outliers = noise_outliers if method == "oe" else None
    first, second, resumed = (tmp_path / name for name in ("a", "b", "r"))
    meta = run(tiny_digits, first, method, outliers=outliers, **params)
    run(tiny_digits, second, method, outliers=outliers, **params)
    assert_same_weights(first / "model.pt", second / "model.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_digits, resumed, method, outliers=outliers, stop_after_epoch=1, **params)
    assert (resumed / "resume/last.pt").exists() and not (resumed / "model.pt").exists()
    run(tiny_digits, resumed, method, outliers=outliers, **params)
    assert_same_weights(first / "model.pt", resumed / "model.pt")
    assert (first / "train_log.csv").read_text().count("\n") == 1 + SETTINGS["epochs"]
    if method == "oe":
        assert meta["n_outliers"] == 20 and len(meta["outliers_manifest_sha256"]) == 64


def test_supcon_checkpoint_holds_the_classifier_only(tiny_digits, tmp_path):
    """The projector trains beside the model but the scorers' checkpoint is the classifier."""
    run(tiny_digits, tmp_path, "supcon", resume=False)
    keys = set(state_dict(tmp_path / "model.pt"))
    assert keys == set(tiny_model().state_dict())


def test_cli_trains_oe_on_an_outlier_manifest(tiny_digits, noise_outliers, tmp_path):
    argv = ["train", "--manifest", str(tiny_digits / "manifest.csv"), "--method", "oe"]
    argv += ["--backbone", BACKBONE, "--settings", '{"epochs": 1, "batch_size": 8}']
    argv += ["--out", str(tmp_path / "model.pt"), "--log-csv", str(tmp_path / "log.csv")]
    argv += ["--outliers", str(noise_outliers / "manifest.csv"), "--device", "cpu"]
    assert main(argv) == 0
    meta = torch.load(tmp_path / "model.pt", weights_only=True)["meta"]
    assert meta["method"] == "oe" and meta["n_outliers"] == 20


# --- mos (group softmax) ----------------------------------------------------------------


def test_groups_are_checked():
    from ood.groups import check_groups

    assert check_groups([[2, 0], [1]], 3) == [[2, 0], [1]]
    for groups, message in [
        ([[0, 1]], r"classes \[2\] are in no group"),
        ([[0, 1], [1, 2]], "class 1 is in group 0 and group 1"),
        ([[0, 3], [1, 2]], r"group 0: 3 is not a class id in 0\.\.2"),
        ([[0, 1, 2], []], "group 1 must be a non-empty list"),
        ("0,1,2", "groups must be a non-empty list of lists"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_groups(groups, 3)
    with pytest.raises(ValueError, match="method 'mos': give method_params.groups"):
        get_objective("mos")


def test_class_log_probs_decode_the_layout():
    from ood.groups import class_log_probs

    # groups [[2, 0], [1]]: logits = [others_0, class 2, class 0 | others_1, class 1]
    logits = np.array([[0.0, 1.0, 3.0, 0.5, -1.0]])
    got = class_log_probs(logits, [[2, 0], [1]])
    first = np.log(np.exp([0.0, 1.0, 3.0]) / np.exp([0.0, 1.0, 3.0]).sum())
    second = np.log(np.exp([0.5, -1.0]) / np.exp([0.5, -1.0]).sum())
    np.testing.assert_allclose(got, [[first[2], second[1], first[1]]], rtol=1e-12)
    assert got.argmax(1).tolist() == [0]


def test_mos_loss_equals_hand_computation():
    torch.manual_seed(0)
    objective = get_objective("mos", {"groups": [[0, 2], [1]]})
    assert objective.num_outputs(3) == 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    images = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    loss, scores = objective.loss(model, Batch([images], labels))
    z = model(images).detach().numpy()

    def ce(row, target):
        return math.log(np.exp(row).sum()) - row[target]

    # group A = [others, 0, 2] (logits 0..2), group B = [others, 1] (logits 3..4)
    target_a = {0: 1, 1: 0, 2: 2}
    target_b = {0: 0, 1: 1, 2: 0}
    expected = np.mean([ce(z[i, :3], target_a[int(y)]) for i, y in enumerate(labels)]) + np.mean(
        [ce(z[i, 3:], target_b[int(y)]) for i, y in enumerate(labels)]
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert scores.shape == (4, 3)


def test_mos_model_to_dump_to_mos_scorer(tiny_digits, tmp_path):
    """A trained group model: its checkpoint, dump metadata, the mos scorer, decoded accuracy."""
    from ood.features import extract
    from ood.groups import class_log_probs
    from ood.metrics import accuracy
    from ood.scores import get_scorer

    meta = run(tiny_digits, tmp_path, "mos", resume=False, groups=[[0, 2], [1]])
    assert meta["group_sizes"] == [3, 2] and meta["group_classes"] == [[0, 2], [1]]
    assert meta["num_classes"] == 3 and meta["num_logits"] == 5
    dump = extract(tmp_path / "model.pt", tiny_digits, "test", tmp_path / "test.parquet", role="id")
    assert dump.logits.shape[1] == 5 and dump.metadata["group_sizes"] == "[3, 2]"
    scores = get_scorer("mos").score(dump)
    # -min over groups of p(others), recomputed here.
    p_a = np.exp(dump.logits[:, 0]) / np.exp(dump.logits[:, :3]).sum(1)
    p_b = np.exp(dump.logits[:, 3]) / np.exp(dump.logits[:, 3:]).sum(1)
    np.testing.assert_allclose(scores, -np.minimum(p_a, p_b), rtol=1e-5)
    # The tables' accuracy decodes the groups; by hand: the class most probable in its group.
    decoded = class_log_probs(dump.logits, [[0, 2], [1]])
    by_hand = []
    for row in dump.logits.astype(np.float64):
        a = np.exp(row[:3]) / np.exp(row[:3]).sum()
        b = np.exp(row[3:]) / np.exp(row[3:]).sum()
        probs = {0: a[1], 2: a[2], 1: b[1]}
        by_hand.append(max(probs, key=probs.get))
    expected = np.mean(np.array(by_hand) == dump.label)
    assert accuracy(decoded, dump.label) == pytest.approx(expected)
