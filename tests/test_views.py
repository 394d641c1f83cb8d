"""Streamed images of any size (`images: stream`): boxes, views, training, features, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from PIL import Image
from test_train import train_into

from ood.data.manifest import write_dataset
from ood.data.views import DRAWS, TRIES, StreamedImages, eval_box, load_eval_views, train_box, view
from ood.features import extract
from ood.io import read_features
from ood.scores.run import score_dumps
from ood.train.loop import TrainSettings

SIZE = 32  # the tiny backbone's input side
SIZES = [(40, 48), (64, 36), (33, 33), (50, 90), (45, 60), (70, 40)]  # (width, height)


def _png(tmp_path, image: Image.Image) -> bytes:
    path = tmp_path / "x.png"
    image.save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """Two classes of images of six different sizes: bright (1) and dark (0) with noise."""
    rng = np.random.default_rng(0)
    records = []
    for split in ("train", "test"):
        for i in range(12):
            label = i % 2
            width, height = SIZES[i % len(SIZES)]
            base = 200 if label else 40
            pixels = rng.integers(-30, 30, (height, width, 3)) + base
            records.append((split, label, pixels.clip(0, 255).astype(np.uint8)))
    out = tmp_path_factory.mktemp("mixed") / "mixed"
    write_dataset(out, records)
    return out


def test_eval_box_is_the_central_square_of_seven_eighths_of_the_shorter_side():
    # 400x300: side 0.875 * 300 = 262.5, centred.
    assert eval_box(400, 300) == (68.75, 18.75, 331.25, 281.25)
    assert eval_box(256, 256) == (16.0, 16.0, 240.0, 240.0)  # 256 -> 224, as ImageNet's eval


def test_train_box_from_hand_picked_uniforms():
    draws = np.full(DRAWS, 0.5)
    # area fraction 0.08 + 0.92 * 0.5 = 0.54, ratio exp(0) = 1: a centred square.
    left, top, right, bottom = train_box(300, 200, draws)
    side = math.sqrt(0.54 * 300 * 200)  # 180
    assert right - left == pytest.approx(side) and bottom - top == pytest.approx(side)
    assert (left + right) / 2 == pytest.approx(150) and (top + bottom) / 2 == pytest.approx(100)
    # The first try too tall for the image (area 1, ratio 3/4) falls to the second try.
    draws = np.zeros(DRAWS)
    draws[0:2] = [1.0, 0.0]
    draws[2:4] = [0.0, 0.5]  # area 0.08, square
    left, top, right, bottom = train_box(200, 100, draws)
    assert right - left == pytest.approx(math.sqrt(0.08 * 200 * 100))
    assert (left, top) == (0.0, 0.0)  # placement uniforms 0: top-left corner


def test_train_box_falls_back_to_the_eval_box_when_no_try_fits():
    draws = np.zeros(DRAWS)
    draws[0 : 2 * TRIES : 2] = 1.0  # the whole area each time, ratio 3/4: taller than 1000x10
    assert train_box(1000, 10, draws) == eval_box(1000, 10)


def test_random_boxes_respect_area_ratio_and_bounds():
    rng = np.random.default_rng(1)
    for _ in range(500):
        width, height = rng.integers(20, 400, 2)
        left, top, right, bottom = train_box(int(width), int(height), rng.random(DRAWS))
        w, h = right - left, bottom - top
        assert 0 <= left and right <= width + 1e-9 and 0 <= top and bottom <= height + 1e-9
        if (left, top, right, bottom) != eval_box(int(width), int(height)):
            assert 0.08 - 1e-9 <= w * h / (width * height) <= 1 + 1e-9
            assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9


def test_eval_view_matches_crop_then_resize(tmp_path):
    # A 64x48 gradient; its eval box (42 px square at (11, 3)) has integer corners.
    x, y = np.meshgrid(np.arange(64), np.arange(48))
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    assert eval_box(64, 48) == (11.0, 3.0, 53.0, 45.0)
    got = view(_png(tmp_path, image), 21, None, tmp_path / "x.png")
    reference = np.asarray(image.crop((11, 3, 53, 45)).resize((21, 21), Image.BILINEAR))
    assert got.shape == (21, 21, 3)
    diff = np.abs(got.astype(int) - reference.astype(int))
    # Inside, the same to rounding; at the border the one-step resize also reads the
    # pixels just outside the box (the crop cannot), so edge cells may differ a little more.
    assert diff[1:-1, 1:-1].max() <= 1 and diff.max() <= 3


def test_train_view_flip_follows_its_last_uniform_and_hflip(tmp_path):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    data = _png(tmp_path, Image.fromarray(pixels))
    draws = np.full(DRAWS, 0.5)
    draws[0] = 1.0  # the whole image (area 1, square)
    draws[-1] = 0.9
    kept = view(data, 8, draws, tmp_path, hflip=True)
    draws[-1] = 0.1
    flipped = view(data, 8, draws, tmp_path, hflip=True)
    assert kept[:, 0].min() == 255 and flipped[:, -1].min() == 255
    np.testing.assert_array_equal(view(data, 8, draws, tmp_path, hflip=False), kept)


def test_unreadable_image_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.png: not a readable image"):
        view(b"not an image", 8, None, tmp_path / "bad.png")


def test_streamed_images_index_take_and_seeded_batches(mixed_sizes):
    images = StreamedImages(mixed_sizes, "train", SIZE, threads=2)
    assert images.shape == (12, SIZE, SIZE, 3) and len(images) == 12
    assert images.labels.tolist() == [0, 1] * 6
    np.testing.assert_array_equal(images[2:5], images.batch([2, 3, 4]))
    subset = images.take([5, 0])
    assert subset.labels.tolist() == [1, 0] and subset.index.tolist() == [5, 0]
    np.testing.assert_array_equal(subset[:], images[np.array([5, 0])])
    one = images.batch([0, 1, 2], torch.Generator().manual_seed(3))
    again = images.batch([0, 1, 2], torch.Generator().manual_seed(3))
    other = images.batch([0, 1, 2], torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    views, labels, index = load_eval_views(mixed_sizes, "test", SIZE)
    assert views.shape == (12, SIZE, SIZE, 3) and index.tolist() == list(range(12, 24))


def test_streamed_training_resumes_exactly_and_feeds_features_and_gradient_scores(
    mixed_sizes, tmp_path
):
    settings = TrainSettings.from_dict(
        {"images": "stream", "hflip": True, "epochs": 2, "batch_size": 4, "lr": 0.05}
    )

    def run(out, **kwargs):
        return train_into(mixed_sizes, out, "ce", settings, backbone=TINY_BACKBONE, **kwargs)

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", resume_dir=tmp_path / "resume", stop_after_epoch=1)
    resumed = run(tmp_path / "cut", resume_dir=tmp_path / "resume")
    assert whole["n_train"] == resumed["n_train"] == 12
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut/model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Features see the eval views of images of six sizes.
    checkpoint = tmp_path / "whole/model.pt"
    dump_path = tmp_path / "test.parquet"
    extract(checkpoint, mixed_sizes, "test", dump_path, role="id", device="cpu", batch_size=5)
    dump = read_features(dump_path)
    assert dump.feature.shape[0] == 12 and dump.index.tolist() == list(range(12, 24))
    # The same numbers from the model on load_eval_views' arrays.
    from ood.models.backbones import features_and_logits, load_checkpoint
    from ood.train.loop import to_model_input

    model, meta = load_checkpoint(checkpoint)
    views, _, _ = load_eval_views(mixed_sizes, "test", SIZE)
    with torch.inference_mode():
        _, logits = features_and_logits(model.eval(), to_model_input(views, *_norm(meta)))[:2]
    np.testing.assert_allclose(dump.logits, logits.numpy(), rtol=1e-5, atol=1e-5)

    # A gradient scorer reads the streamed eval views through the dump's rows.
    (scores,) = score_dumps(
        "gradnorm",
        {},
        [(dump_path, tmp_path / "gn.parquet", mixed_sizes)],
        checkpoint=checkpoint,
        device="cpu",
        batch_size=5,
    )
    assert scores.score.shape == (12,) and np.isfinite(scores.score).all()


def _norm(meta):
    return meta["settings"]["mean"], meta["settings"]["std"]


def test_images_setting_is_checked():
    with pytest.raises(ValueError, match="training setting images: 'disk'; known: memory, stream"):
        TrainSettings.from_dict({"images": "disk"})


def test_class_embeddings_learn_from_streamed_images_of_several_sizes(mixed_sizes):
    from ood.synthesis import embeddings as emb

    images = StreamedImages(mixed_sizes, "train", SIZE, threads=2)
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    settings = emb.EmbedSettings(
        encoder=TINY_BACKBONE, epochs=4, batch_size=4, lr=0.05, images="stream"
    )
    class_emb, id_emb, accuracy = emb.learn_embeddings(
        images, images.labels, 2, table, settings, torch.device("cpu")
    )
    assert class_emb.shape == (2, 16) and id_emb.shape == (12, 16)
    # Bright against dark: the nearest class embedding (by cosine) gets every image right.
    nearest = (id_emb @ torch.nn.functional.normalize(class_emb, dim=1).T).argmax(1)
    assert nearest.tolist() == images.labels.tolist() and accuracy == 1.0
    with pytest.raises(ValueError, match="synthesis setting images: 'disk'"):
        emb.EmbedSettings(images="disk")


def test_prefetched_batches_are_the_views_drawn_in_announced_order(mixed_sizes):
    from ood.train.loop import StreamedInputs, to_model_input

    settings = TrainSettings.from_dict({"images": "stream", "hflip": True})
    images = StreamedImages(mixed_sizes, "train", SIZE, threads=2)
    calls = [torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([0, 1, 2])]
    inputs = StreamedInputs(images, settings)
    inputs.start_epoch(calls, torch.Generator().manual_seed(5))
    got = [inputs.views(idx, None) for idx in calls]
    # Synchronously, one generator drawn in the same order: the same tensors.
    gen = torch.Generator().manual_seed(5)
    for idx, tensor in zip(calls, got, strict=True):
        batch = images.batch(idx, gen, hflip=True)
        torch.testing.assert_close(tensor, to_model_input(batch, settings.mean, settings.std))
    assert not torch.equal(got[0], got[2])  # the same rows, new random crops
    inputs.start_epoch(calls, torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="out of the order announced"):
        inputs.views(torch.tensor([3, 4]), None)
