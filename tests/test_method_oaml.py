"""oaml: each term against a hand computation, where its gradients go (student,
teacher, CLUB's q-nets), loading the teacher both ways and its errors, resizing
for a teacher of another input size, and the shared loop's determinism and
resume with an outlier stream and a teacher."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import BACKBONE, assert_same_weights, state_dict, train_into
from torch.nn import functional as F

from ood.models.backbones import build_model, features_and_logits, load_checkpoint
from ood.models.specs import BACKBONES
from ood.train import get_objective
from ood.train.loop import TrainSettings, train
from ood.train.oaml import (
    club,
    club_estimate,
    distance_structure_kl,
    kd_logits,
    resize_to,
)
from ood.train.objective import Batch, TrainContext

TEACHER = "vit_tiny_32"
SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 0.02, "crop_padding": 2, "hflip": True}
SMALL = {"club_hidden": 16}


@pytest.fixture(scope="module")
def teacher_checkpoint(tiny_digits, tmp_path_factory):
    """An `ood train` ce checkpoint of the tiny ViT on tiny_digits (3 classes)."""
    out = tmp_path_factory.mktemp("teacher")
    settings = TrainSettings.from_dict({"epochs": 1, "batch_size": 8, "crop_padding": 0})
    train(
        tiny_digits,
        out / "model.pt",
        out / "log.csv",
        method="ce",
        backbone=TEACHER,
        settings=settings,
        seed=1,
        device="cpu",
        threads=1,
    )
    return out / "model.pt"


def bare_teacher(path, backbone=TEACHER, num_classes=3, seed=7):
    torch.manual_seed(seed)
    model = build_model(backbone, num_classes)
    torch.save(model.state_dict(), path)
    return model.eval()


def student(num_classes=3):
    torch.manual_seed(0)
    return build_model(BACKBONE, num_classes)


def context(teacher, backbone=None, num_classes=3):
    ctx = TrainContext.uniform(num_classes)
    ctx.teacher, ctx.teacher_backbone = str(teacher), backbone
    return ctx


def tiny_batch(n_id=4, n_ood=3, seed=3):
    torch.manual_seed(seed)
    images = torch.randn(n_id, 3, 32, 32)
    outliers = torch.randn(n_ood, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1, 0, 2][:n_id])
    return Batch([images], labels, outliers, gen=torch.Generator().manual_seed(11))


# --- the terms by hand ------------------------------------------------------------------


def softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def test_kd_logits_equals_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    temperature = 3.0
    expected = 0.0
    for si, ti in zip(s.numpy(), t.numpy(), strict=True):
        ps, pt = softmax(si / temperature), softmax(ti / temperature)
        expected += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(4))
    expected *= temperature**2 / 5
    assert float(kd_logits(s, t, temperature)) == pytest.approx(expected, rel=1e-12)
    assert float(kd_logits(t, t, temperature)) == pytest.approx(0.0, abs=1e-15)


def hand_structure(x, temperature):
    """Row distributions of the distance structure, from explicit loops."""
    n = len(x)
    d = {(i, j): math.dist(x[i], x[j]) for i in range(n) for j in range(n) if i != j}
    mean = sum(d.values()) / len(d)
    rows = []
    for i in range(n):
        weights = {j: math.exp(-d[i, j] / (temperature * mean)) for j in range(n) if j != i}
        total = sum(weights.values())
        rows.append({j: w / total for j, w in weights.items()})
    return rows


def test_distance_structure_kl_equals_loops():
    torch.manual_seed(1)
    s = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randn(5, 7, dtype=torch.float64)  # another width: only distances meet
    temperature = 0.5
    ps, pt = hand_structure(s.tolist(), temperature), hand_structure(t.tolist(), temperature)
    expected = np.mean(
        [sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for j in pt[i]) for i in range(5)]
    )
    assert float(distance_structure_kl(s, t, temperature)) == pytest.approx(expected, rel=1e-10)
    # Scale-free (distances over their mean): a scaled copy has the teacher's structure.
    assert float(distance_structure_kl(3.0 * t, t, temperature)) == pytest.approx(0, abs=1e-12)


def log_normal(y, mu, logvar):
    return sum(
        -0.5 * ((y[k] - mu[k]) ** 2 / math.exp(logvar[k]) + logvar[k] + math.log(2 * math.pi))
        for k in range(len(y))
    )


def test_club_estimate_equals_double_loop():
    torch.manual_seed(2)
    n, d = 4, 3
    mu, logvar, y = (torch.randn(n, d, dtype=torch.float64) for _ in range(3))
    m, lv, ys = mu.tolist(), logvar.tolist(), y.tolist()
    positive = np.mean([log_normal(ys[i], m[i], lv[i]) for i in range(n)])
    negative = np.mean([log_normal(ys[j], m[i], lv[i]) for i in range(n) for j in range(n)])
    got = float(club_estimate(mu, logvar, y))
    assert got == pytest.approx(positive - negative, rel=1e-10)
    # A q that ignores x (the same Gaussian for every row) measures no information.
    same = club_estimate(mu[:1].expand(n, d), logvar[:1].expand(n, d), y)
    assert float(same) == pytest.approx(0.0, abs=1e-12)


def test_club_returns_the_estimate_and_the_fit_of_q():
    from ood.train.oaml import GaussianQ

    torch.manual_seed(3)
    q = GaussianQ(5, 3, 8).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    estimate, fit = club(q, x, y)
    mu, logvar = q(x)
    expected = club_estimate(mu, logvar, y).detach()
    assert float(estimate.detach()) == pytest.approx(float(expected), rel=1e-12)
    normal = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    expected = normal.log_prob(y).sum(1).mean().detach()
    assert float(fit.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert float(logvar.detach().abs().max()) <= 1.0  # tanh-bounded log-variance


def test_resize_is_bilinear_to_the_teacher_size():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    assert resize_to(x, 32) is x
    # Halving with bilinear sampling at pixel centres averages each 2x2 block.
    torch.testing.assert_close(resize_to(x, 16), F.avg_pool2d(x, 2))
    assert resize_to(x, 224).shape == (2, 3, 224, 224)


# --- the objective: loss, gradients -----------------------------------------------------


def test_loss_equals_the_terms_by_hand(tmp_path):
    teacher = bare_teacher(tmp_path / "teacher.pt")
    model = student()
    objective = get_objective("oaml", SMALL)
    q = objective.setup(model, context(tmp_path / "teacher.pt", TEACHER))
    batch = tiny_batch()
    model.train()
    loss, logits = objective.loss(model, batch)

    with torch.no_grad():
        images = torch.cat([batch.views[0], batch.outliers])
        feature, out = features_and_logits(model, images)
        t_feature, t_out = features_and_logits(teacher, images)
        s_np, t_np = out.double().numpy(), t_out.double().numpy()
        labels = batch.labels.tolist()
        ce = np.mean([math.log(np.exp(s_np[i]).sum()) - s_np[i, y] for i, y in enumerate(labels)])
        kd = (
            16
            / 4
            * sum(
                (pt := softmax(t_np[i] / 4)) @ np.log(pt / softmax(s_np[i] / 4)) for i in range(4)
            )
        )
        ps, pt = (hand_structure(f.double().tolist(), 0.1) for f in (feature, t_feature))
        structure = np.mean(
            [sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for j in pt[i]) for i in range(7)]
        )
        # Term 1: the 3 first ID rows with outliers in the order the batch's generator draws.
        order = torch.randperm(3, generator=torch.Generator().manual_seed(11))
        x1, y1 = feature[:3], feature[4:][order]
        x2, y2 = feature[4:], torch.softmax(out[4:], dim=1)

        def by_loops(net, x, y):
            mu, lv = (v.double().tolist() for v in net(x))
            ys, n = y.double().tolist(), len(x)
            pos = np.mean([log_normal(ys[i], mu[i], lv[i]) for i in range(n)])
            neg = np.mean([log_normal(ys[j], mu[i], lv[i]) for i in range(n) for j in range(n)])
            return pos - neg, pos

        club1, fit1 = by_loops(q["id_ood"], x1, y1)
        club2, fit2 = by_loops(q["ood_class"], x2, y2)
    expected = ce + 4 * kd + 8 * structure + 0.1 * club1 + 0.2 * club2 - fit1 - fit2
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(logits.detach().numpy(), s_np[:4], rtol=1e-5, atol=1e-6)
    terms = objective.terms(model, tiny_batch())
    assert float(terms["club_id_ood"]) == pytest.approx(club1, rel=1e-4, abs=1e-5)
    assert float(terms["kd_feature"]) == pytest.approx(structure, rel=1e-4)


def grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None and p.grad.any()}


def test_where_the_gradients_go(tmp_path):
    bare_teacher(tmp_path / "teacher.pt")
    model = student()
    objective = get_objective("oaml", SMALL)
    q = objective.setup(model, context(tmp_path / "teacher.pt", TEACHER))
    teacher = objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in q.parameters()}
    model.train()

    def backward(pick):
        model.zero_grad(set_to_none=True)
        q.zero_grad(set_to_none=True)
        pick(objective.terms(model, tiny_batch())).backward()
        return grads(model), grads(q), grads(teacher)

    # The whole loss: the student and both q-nets learn, the teacher does not.
    model.zero_grad()
    objective.loss(model, tiny_batch())[0].backward()
    student_g, q_g, teacher_g = grads(model), grads(q), grads(teacher)
    assert "conv1.weight" in student_g and "fc.weight" in student_g
    assert {n.split(".")[0] for n in q_g} == {"id_ood", "ood_class"}
    assert not teacher_g
    # CE and KD each reach the student's backbone and classifier.
    for key in ("ce", "kd_logit", "kd_feature"):
        student_g, q_g, _ = backward(lambda t, key=key: t[key])
        assert "conv1.weight" in student_g, key
        assert not q_g, key
    assert "fc.weight" in backward(lambda t: t["kd_logit"])[0]
    # The CLUB estimates move the student's features, never the q-nets.
    for key in ("club_id_ood", "club_ood_class"):
        student_g, q_g, teacher_g = backward(lambda t, key=key: t[key])
        assert "conv1.weight" in student_g and not q_g and not teacher_g, key
    # Term 2 also moves the classifier, through the outliers' softmax.
    assert "fc.weight" in backward(lambda t: t["club_ood_class"])[0]
    # The likelihood fit trains the q-nets only.
    student_g, q_g, _ = backward(lambda t: -t["fit"])
    assert not student_g and {n.split(".")[0] for n in q_g} == {"id_ood", "ood_class"}
    # So the loss's q gradient is the fit's, whatever the estimates' weights.
    loss_q = {}
    for weights in ({}, {"club_id_ood": 5.0, "club_ood_class": 0.0}):
        other = get_objective("oaml", {**SMALL, **weights})
        other.extra, other.teacher, other.teacher_size = q, teacher, 32
        model.zero_grad()
        q.zero_grad(set_to_none=True)
        other.loss(model, tiny_batch())[0].backward()
        loss_q[len(weights)] = {n: g.clone() for n, g in grads(q).items()}
    assert loss_q[0].keys() == loss_q[2].keys()
    for name in loss_q[0]:
        torch.testing.assert_close(loss_q[0][name], loss_q[2][name])


def test_parameters_and_missing_outliers(tmp_path):
    with pytest.raises(ValueError, match="'kd_temperature' must be > 0"):
        get_objective("oaml", {"kd_temperature": 0})
    with pytest.raises(ValueError, match="'club_hidden' must be an integer >= 1"):
        get_objective("oaml", {"club_hidden": 2.5})
    bare_teacher(tmp_path / "teacher.pt")
    objective = get_objective("oaml", SMALL)
    objective.setup(student(), context(tmp_path / "teacher.pt", TEACHER))
    batch = tiny_batch()
    batch.outliers = None
    with pytest.raises(ValueError, match="oaml: the batch carries no outliers"):
        objective.loss(student(), batch)


# --- the teacher ------------------------------------------------------------------------


def test_teacher_from_an_ood_checkpoint_and_a_bare_state_dict(teacher_checkpoint, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    objective = get_objective("oaml", SMALL)
    objective.setup(student(), context(teacher_checkpoint))
    assert objective.teacher_name == TEACHER and objective.meta() == {"teacher_backbone": TEACHER}
    reference, _ = load_checkpoint(teacher_checkpoint)
    torch.testing.assert_close(objective.teacher(x), reference(x))
    assert not objective.teacher.training
    assert not any(p.requires_grad for p in objective.teacher.parameters())

    saved = bare_teacher(tmp_path / "bare.pt")
    objective = get_objective("oaml", SMALL)
    objective.setup(student(), context(tmp_path / "bare.pt", TEACHER))
    with torch.no_grad():
        torch.testing.assert_close(objective.teacher(x), saved(x))


def test_teacher_errors(teacher_checkpoint, tiny_digits, noise_outliers, tmp_path):
    bare_teacher(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare\.pt: the teacher is a bare state dict.*backbone"):
        get_objective("oaml").setup(student(), context(tmp_path / "bare.pt"))
    bare_teacher(tmp_path / "five.pt", num_classes=5)
    with pytest.raises(ValueError, match="five.pt: the teacher classifies 5 classes; the student"):
        get_objective("oaml").setup(student(), context(tmp_path / "five.pt", TEACHER))
    with pytest.raises(ValueError, match="model.pt: the teacher classifies 3 classes"):
        get_objective("oaml").setup(student(4), context(teacher_checkpoint, num_classes=4))
    with pytest.raises(ValueError, match="teacher_backbone 'resnet50', but the checkpoint holds"):
        get_objective("oaml").setup(student(), context(teacher_checkpoint, "resnet50"))
    with pytest.raises(ValueError, match="method 'oaml' distils from a teacher"):
        run(tiny_digits, tmp_path / "none", noise_outliers, None)
    assert not (tmp_path / "none" / "model.pt").exists()


def test_a_teacher_of_another_input_size_sees_the_batch_resized(tmp_path, monkeypatch):
    """A tiny ViT built for 16x16 input: the 32x32 batch reaches it bilinearly halved."""
    spec = BACKBONES[TEACHER]
    kwargs = tuple((k, 16 if k == "img_size" else v) for k, v in spec.kwargs)
    monkeypatch.setitem(BACKBONES, "vit_tiny_16", replace(spec, input_size=16, kwargs=kwargs))
    bare_teacher(tmp_path / "t16.pt", backbone="vit_tiny_16")
    objective = get_objective("oaml", SMALL)
    objective.setup(student(), context(tmp_path / "t16.pt", "vit_tiny_16"))
    seen = []
    # The patch embedding takes the image: what the teacher is given.
    objective.teacher.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = tiny_batch()
    loss, _ = objective.loss(student().train(), batch)
    assert torch.isfinite(loss)
    images = torch.cat([batch.views[0], batch.outliers])
    assert len(seen) == 1 and seen[0].shape == (7, 3, 16, 16)
    torch.testing.assert_close(seen[0], F.avg_pool2d(images, 2))


# --- the shared loop --------------------------------------------------------------------


def run(dataset, out, outliers, teacher, *, stop_after_epoch=None, resume=True):
    settings = TrainSettings.from_dict({**SETTINGS, "method_params": SMALL})
    return train_into(
        dataset,
        out,
        "oaml",
        settings,
        resume_dir=out / "resume" if resume else None,
        outliers_dir=outliers,
        teacher=teacher,
        stop_after_epoch=stop_after_epoch,
    )


def test_loop_same_seed_identical_resume_equal_classifier_only_checkpoint(
    tiny_digits, noise_outliers, teacher_checkpoint, tmp_path
):
    first, second, resumed = (tmp_path / name for name in ("a", "b", "r"))
    meta = run(tiny_digits, first, noise_outliers, teacher_checkpoint)
    run(tiny_digits, second, noise_outliers, teacher_checkpoint)
    assert_same_weights(first / "model.pt", second / "model.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_digits, resumed, noise_outliers, teacher_checkpoint, stop_after_epoch=1)
    assert (resumed / "resume/last.pt").exists() and not (resumed / "model.pt").exists()
    run(tiny_digits, resumed, noise_outliers, teacher_checkpoint)
    assert_same_weights(first / "model.pt", resumed / "model.pt")
    # The checkpoint the scorers read is the student classifier: no teacher, no q-nets.
    assert set(state_dict(first / "model.pt")) == set(student().state_dict())
    digest = hashlib.sha256(teacher_checkpoint.read_bytes()).hexdigest()
    assert meta["teacher_sha256"] == digest and meta["teacher_backbone"] == TEACHER
    assert meta["n_outliers"] == 20 and meta["method"] == "oaml"
    # The weights moved away from the seed's initialisation.
    init = student().state_dict()
    trained = state_dict(first / "model.pt")
    assert not torch.equal(trained["conv1.weight"], init["conv1.weight"])
