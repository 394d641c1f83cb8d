"""Outlier synthesis: boundary sampling, class-token replacement, resumable shards, the outlier set.

The pipeline is the tiny random one `ood synth-pipeline` writes (the real code
path of loading a diffusers folder); its images carry no meaning.
"""

from __future__ import annotations

import csv
import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE

from ood.cli import main
from ood.data.manifest import load_images, read_manifest
from ood.synthesis import embeddings as emb
from ood.synthesis import generate as gen
from ood.synthesis.pipeline import (
    PLACEHOLDER,
    PipelineError,
    PromptEncoder,
    load_pipeline,
    load_text_encoder,
    token_embeddings,
    write_tiny_pipeline,
)

EMBED = {"encoder": TINY_BACKBONE, "epochs": 1, "batch_size": 8, "k": 2, "keep": 3, "pool": 10}
SAMPLE = {"steps": 2, "resolution": 32, "batch_size": 2}  # 3 per class: batches of 2 and 1


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny_sd")


@pytest.fixture(scope="module")
def embeddings(tiny_digits, pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "embeddings.pt"
    emb.embed(tiny_digits, pipeline_dir, out, emb.EmbedSettings(**EMBED), device="cpu", threads=1)
    return out


# --- boundary sampling ---------------------------------------------------------------------


def test_knn_distance_and_selection_match_a_hand_worked_case():
    bank = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    candidates = torch.tensor([[0.5], [5.0], [20.0], [1.5]])
    # 2nd-nearest distances by hand: 0.5 -> {0.5, 0.5, 1.5, 9.5} -> 0.5; 5 -> {3, 4, ...} -> 4;
    # 20 -> {10, 18, ...} -> 18; 1.5 -> {0.5, 0.5, ...} -> 0.5.
    assert emb.knn_distance(candidates, bank, 2).tolist() == [0.5, 4.0, 18.0, 0.5]
    order, dist = emb.select_boundary(candidates, bank, k=2, keep=2)
    assert order.tolist() == [2, 1] and dist.tolist() == [18.0, 4.0]
    order, _ = emb.select_boundary(candidates, bank, k=2, keep=4)
    assert order.tolist() == [2, 1, 0, 3]  # the tie 0.5 / 0.5 keeps index order


def test_knn_distance_rejects_k_beyond_the_bank():
    with pytest.raises(ValueError, match=r"k=5 needs 1 <= k <= 4"):
        emb.knn_distance(torch.zeros(1, 2), torch.zeros(4, 2), 5)


def test_sampled_embeddings_are_the_farthest_candidates_of_the_pool():
    bank = torch.nn.functional.normalize(
        torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    )
    settings = emb.EmbedSettings(sigma=0.3, k=5, keep=6, pool=50)
    vectors, dist = emb.sample_boundary(bank, settings, torch.Generator().manual_seed(7))
    # The same pool again, and its k-NN distances by brute force in numpy.
    g = torch.Generator().manual_seed(7)
    centres = bank[torch.randint(40, (50,), generator=g)]
    pool = torch.nn.functional.normalize(centres + 0.3 * torch.randn(centres.shape, generator=g))
    pairwise = np.linalg.norm(pool.numpy()[:, None, :] - bank.numpy()[None, :, :], axis=2)
    knn = np.sort(pairwise, axis=1)[:, 4]
    farthest = np.argsort(-knn, kind="stable")[:6]
    np.testing.assert_allclose(vectors.numpy(), pool.numpy()[farthest], atol=1e-6)
    np.testing.assert_allclose(dist.numpy(), knn[farthest], rtol=1e-5)
    assert dist.min() >= np.delete(knn, farthest).max()
    np.testing.assert_allclose(vectors.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_outlier_vectors_take_the_class_embedding_norm_and_need_k_images_per_class():
    class_emb = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    id_emb = torch.nn.functional.normalize(torch.randn(10, 2, generator=torch.Generator()))
    labels = np.array([0] * 5 + [1] * 5)
    settings = emb.EmbedSettings(k=3, keep=2, pool=8)
    vectors, dist = emb.sample_outlier_embeddings(class_emb, id_emb, labels, settings)
    assert vectors.shape == (2, 2, 2) and dist.shape == (2, 2)
    np.testing.assert_allclose(vectors.norm(dim=2).numpy(), [[3.0, 3.0], [0.5, 0.5]], rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"k=6 needs at least 6 ID train images per class; class 0 has 5"
    ):
        emb.sample_outlier_embeddings(
            class_emb, id_emb, labels, emb.EmbedSettings(k=6, keep=2, pool=8)
        )


def test_embed_settings_reject_bad_values_by_name():
    with pytest.raises(ValueError, match=r"keep \(60\) exceeds pool \(50\)"):
        emb.EmbedSettings(keep=60, pool=50)
    with pytest.raises(ValueError, match=r"unknown synthesis setting\(s\) \['sigmaa'\]"):
        emb.EmbedSettings.from_dict({"sigmaa": 0.1})
    with pytest.raises(ValueError, match="encoder: unknown backbone 'nope'"):
        emb.learn_embeddings(
            np.zeros((4, 32, 32, 3), np.uint8),
            np.array([0, 0, 1, 1]),
            2,
            torch.ones(5, 4),
            emb.EmbedSettings(encoder="nope"),
            torch.device("cpu"),
        )


def test_learned_class_embeddings_separate_two_easy_classes():
    images = np.random.default_rng(0).integers(0, 100, (32, 32, 32, 3)).astype(np.uint8)
    images[16:] += 150  # class 1 bright noise, class 0 dark noise
    labels = np.array([0] * 16 + [1] * 16)
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    settings = emb.EmbedSettings(encoder=TINY_BACKBONE, epochs=3, batch_size=8, lr=0.05)
    class_emb, id_emb, accuracy = emb.learn_embeddings(
        images, labels, 2, table, settings, torch.device("cpu")
    )
    assert accuracy == 1.0
    assert class_emb.shape == (2, 16) and id_emb.shape == (32, 16)
    mean_norm = float(table.norm(dim=1).mean())
    np.testing.assert_allclose(class_emb.norm(dim=1).numpy(), mean_norm, rtol=1e-5)
    # Independent check of the accuracy: nearest class embedding by cosine.
    nearest = (id_emb @ torch.nn.functional.normalize(class_emb, dim=1).T).argmax(1)
    assert nearest.tolist() == labels.tolist()


def test_embed_writes_one_vector_per_kept_sample_per_class(embeddings, tiny_digits):
    data = torch.load(embeddings, weights_only=True)
    assert data["num_classes"] == 3
    assert data["vectors"].shape == (3, 3, 32)  # 3 classes x keep 3 x the tiny token width
    assert data["settings"]["k"] == 2
    norms = data["class_embeddings"].norm(dim=1)
    np.testing.assert_allclose(
        data["vectors"].norm(dim=2).numpy(), norms[:, None].expand(3, 3), rtol=1e-5
    )
    # Farthest first within each class.
    assert (data["knn_distance"][:, :-1] >= data["knn_distance"][:, 1:]).all()


# --- the class token ---------------------------------------------------------------------


def test_replaced_token_reaches_the_text_encoder_output(pipeline_dir):
    tokenizer, text_encoder = load_text_encoder(pipeline_dir)
    template = "a photo of a {}"
    encoder = PromptEncoder(tokenizer, text_encoder, template)
    # The embedding of the word "x" in the class slot gives the plain prompt's states.
    x_id = tokenizer.convert_tokens_to_ids("x</w>")
    x_vector = token_embeddings(text_encoder)[x_id].detach()
    plain_ids = tokenizer(
        template.format("x"),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        plain = text_encoder(plain_ids)[0]
    torch.testing.assert_close(encoder(x_vector[None]), plain)
    # Another vector changes the states from the class slot on; causal attention keeps those before.
    other = encoder(torch.randn(2, x_vector.numel(), generator=torch.Generator().manual_seed(0)))
    p = encoder.position
    assert plain_ids[0, p] == x_id
    torch.testing.assert_close(other[:, :p], plain.expand(2, -1, -1)[:, :p])
    assert (other[:, p:] - plain[:, p:]).abs().amax() > 1e-3
    assert (other[0, p:] - other[1, p:]).abs().amax() > 1e-3  # one vector per prompt of the batch


def test_prompt_templates_are_checked(pipeline_dir):
    tokenizer, text_encoder = load_text_encoder(pipeline_dir)
    with pytest.raises(PipelineError, match="must contain {} exactly once"):
        PromptEncoder(tokenizer, text_encoder, "a photo")
    with pytest.raises(PipelineError, match="longer than the text encoder's 32 tokens"):
        PromptEncoder(tokenizer, text_encoder, "a very very long and detailed description of a {}")
    assert PromptEncoder(tokenizer, text_encoder, "a {}").prompt() == f"a {PLACEHOLDER}"


def test_pipeline_folder_and_fp16_errors_are_clear(tmp_path, pipeline_dir):
    with pytest.raises(PipelineError, match=rf"{tmp_path}: no model_index.json"):
        load_pipeline(tmp_path, torch.device("cpu"))
    with pytest.raises(PipelineError, match="fp16 synthesis needs a CUDA device"):
        load_pipeline(pipeline_dir, torch.device("cpu"), fp16=True)


def test_the_tiny_pipeline_is_the_same_for_the_same_seed(tmp_path, pipeline_dir):
    again = write_tiny_pipeline(tmp_path / "again")
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert filecmp.cmp(again / weights, pipeline_dir / weights, shallow=False)


# --- shards ----------------------------------------------------------------------------------


def test_a_bad_embeddings_file_is_named(pipeline_dir, tmp_path):
    settings = gen.SampleSettings(**SAMPLE)
    out = tmp_path / "s.csv"
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: embeddings file not found"):
        gen.generate_shard(tmp_path / "missing.pt", pipeline_dir, tmp_path, (1, 1), out, settings)
    torch.save({"vectors": torch.zeros(2, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: not an embeddings file"):
        gen.generate_shard(tmp_path / "bad.pt", pipeline_dir, tmp_path, (1, 1), out, settings)
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not an embeddings file written by synth"):
        gen.generate_shard(tmp_path / "junk.pt", pipeline_dir, tmp_path, (1, 1), out, settings)
    assert not out.exists()


def test_shards_split_classes_into_contiguous_ranges():
    assert [list(gen.shard_classes(10, i, 3)) for i in (1, 2, 3)] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8, 9],
    ]
    assert list(gen.shard_classes(2, 3, 3)) == [1]  # more shards than classes: some are empty
    with pytest.raises(ValueError, match="shard 4 of 3"):
        gen.shard_classes(10, 4, 3)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _generate(embeddings, pipeline_dir, root, shard, **sample):
    settings = gen.SampleSettings(**{**SAMPLE, **sample})
    out = root / "shards" / f"{shard[0]}of{shard[1]}.csv"
    return gen.generate_shard(
        embeddings, pipeline_dir, root, shard, out, settings, device="cpu", threads=1
    )


@pytest.fixture(scope="module")
def one_run(embeddings, pipeline_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_run")
    _generate(embeddings, pipeline_dir, root, (1, 1))
    return root


def test_a_shard_writes_images_latents_contact_sheets_and_its_csv(one_run):
    rows = list(csv.DictReader(open(one_run / "shards/1of1.csv")))
    assert [int(r["embedding_id"]) for r in rows] == list(range(9))
    assert [int(r["seed"]) for r in rows] == list(range(9))  # seed 0: image seed = embedding id
    first = rows[4]
    assert (first["class"], first["sample"]) == ("1", "1")
    image = np.asarray(__import__("PIL.Image").Image.open(one_run / first["image"]))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.load(one_run / first["latent"]).shape == (4, 16, 16)  # the tiny VAE halves the side
    sheets = sorted(p.name for p in (one_run / "contact").iterdir())
    assert sheets == ["class0000.png", "class0001.png", "class0002.png"]
    assert not list(one_run.rglob("*.partial*"))


def test_an_interrupted_shard_resumes_to_the_same_files_as_one_run(
    embeddings, pipeline_dir, one_run, tmp_path, monkeypatch
):
    real_write = gen._write_image
    calls = []

    def dies_on_the_fourth(*args):
        calls.append(args)
        if len(calls) == 5:  # class 0 done, class 1's first batch half written
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(gen, "_write_image", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        _generate(embeddings, pipeline_dir, tmp_path, (1, 1))
    assert not (tmp_path / "shards/1of1.csv").exists()  # the CSV, written last, marks done
    monkeypatch.setattr(gen, "_write_image", real_write)
    resumed = []
    monkeypatch.setattr(gen, "_generate_batch", _counting(gen._generate_batch, resumed))
    _generate(embeddings, pipeline_dir, tmp_path, (1, 1))
    assert len(resumed) == 4  # batches left: class 1's second, and class 2's two (of 6)
    assert _tree(tmp_path) == _tree(one_run)


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def test_two_shards_make_the_same_images_as_one(embeddings, pipeline_dir, one_run, tmp_path):
    _generate(embeddings, pipeline_dir, tmp_path, (1, 2))
    _generate(embeddings, pipeline_dir, tmp_path, (2, 2))
    generated = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("shards/")}
    assert generated == {k: v for k, v in _tree(one_run).items() if not k.startswith("shards/")}
    rows = [r for i in (1, 2) for r in csv.DictReader(open(tmp_path / f"shards/{i}of2.csv"))]
    assert rows == list(csv.DictReader(open(one_run / "shards/1of1.csv")))


def test_other_sampler_settings_never_reuse_older_images(
    embeddings, pipeline_dir, one_run, tiny_digits, tmp_path, caplog
):
    shutil.copytree(one_run / "generated", tmp_path / "generated")  # an older run's images
    rows = _generate(embeddings, pipeline_dir, tmp_path, (1, 1), steps=3)
    old = list(csv.DictReader(open(one_run / "shards/1of1.csv")))
    old_run, new_run = old[0]["image"].split("/")[1], rows[0]["image"].split("/")[1]
    assert new_run != old_run
    # Collecting names the older run as unused (it stays on disk).
    caplog.set_level("INFO", logger="ood.synthesis.generate")
    caplog.clear()
    settings = gen.SampleSettings(**{**SAMPLE, "steps": 3})
    gen.collect([tmp_path / "shards/1of1.csv"], tmp_path, tiny_digits, tmp_path / "set", settings)
    assert (
        f"older runs not in this set (from other settings; delete them to free space): {old_run}"
        in caplog.text
    )
    assert new_run not in caplog.text and (tmp_path / "generated" / old_run).is_dir()


# --- the outlier set -----------------------------------------------------------------------


def test_collected_shards_load_as_an_outlier_set_and_train_oe(one_run, tiny_digits, tmp_path):
    from test_train import train_into

    from ood.train.loop import TrainSettings

    settings = gen.SampleSettings(**SAMPLE)
    overview = tmp_path / "overview.png"
    manifest = gen.collect(
        [one_run / "shards/1of1.csv"], one_run, tiny_digits, tmp_path / "set", settings, overview
    )
    images, labels, _ = load_images(manifest.parent)
    assert images.shape == (9, 32, 32, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {row.split for row in read_manifest(manifest.parent)} == {"train"}
    table = list(csv.DictReader(open(manifest.parent / "synthesis.csv")))
    assert [int(r["index"]) for r in table] == list(range(9))
    assert table[5]["prompt"] == f"a high-quality photo of a {PLACEHOLDER}"
    assert (table[5]["steps"], table[5]["guidance"], table[5]["seed"]) == ("2", "7.5", "5")
    # The set's pixels are the generated images (same size here, so unchanged).
    first = np.asarray(__import__("PIL.Image").Image.open(one_run / table[0]["image"]))
    np.testing.assert_array_equal(images[0], first)
    # The overview: a row per class, its 3 images in sample order (32 px cells, no resize).
    sheet = np.asarray(__import__("PIL.Image").Image.open(overview))
    assert sheet.shape == (3 * 32, 3 * 32, 3)
    np.testing.assert_array_equal(sheet[32:64, 64:96], images[5])  # class 1, sample 2
    meta = train_into(
        tiny_digits,
        tmp_path,
        "oe",
        TrainSettings.from_dict({"epochs": 1, "batch_size": 4, "outlier_batch_size": 4}),
        outliers_dir=manifest.parent,
    )
    assert meta["n_outliers"] == 9


def test_overview_spreads_rows_over_many_classes_and_keeps_sample_order(tmp_path):
    from PIL import Image

    # 40 classes x 10 samples, listed out of order; each image's colour encodes (class, sample).
    rows = []
    for c in reversed(range(40)):
        for j in reversed(range(10)):
            path = tmp_path / f"c{c}_{j}.png"
            Image.new("RGB", (4, 4), (c, j, 7)).save(path)
            rows.append({"class": str(c), "sample": str(j), "image": path.name})
    grid = gen.overview_grid(rows, tmp_path)
    # 16 of 40 classes: round(linspace(0, 39, 16)), the first and last included.
    expected = np.round(np.linspace(0, 39, 16)).astype(int).tolist()
    assert [int(r[0].name.split("_")[0][1:]) for r in grid] == expected
    assert [p.name for p in grid[1]] == [f"c3_{j}.png" for j in range(8)]  # linspace[1] = 2.6
    gen.grid_sheet(grid, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (16 * 4, 8 * 4, 3)
    np.testing.assert_array_equal(sheet[15 * 4, 7 * 4], [39, 7, 7])  # last row, 8th sample


def test_collect_resizes_to_the_id_size_and_names_a_missing_shard(
    one_run, tiny_digits_16, tmp_path
):
    settings = gen.SampleSettings(**SAMPLE)
    manifest = gen.collect(
        [one_run / "shards/1of1.csv"], one_run, tiny_digits_16, tmp_path / "set", settings
    )
    assert load_images(manifest.parent)[0].shape == (9, 16, 16, 3)
    kept = gen.collect(
        [one_run / "shards/1of1.csv"],
        one_run,
        tiny_digits_16,
        tmp_path / "kept",
        settings,
        keep_size=True,
    )
    assert load_images(kept.parent)[0].shape == (9, 32, 32, 3)  # for images: stream
    rows = list(csv.DictReader(open(one_run / "shards/1of1.csv")))
    partial = tmp_path / "part.csv"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=gen.SHARD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[3:])
    with pytest.raises(ValueError, match="do not cover embedding ids 0..N-1 exactly once"):
        gen.collect([partial], one_run, tiny_digits_16, tmp_path / "bad", settings)
    assert not (tmp_path / "bad").exists()


def test_cli_runs_the_three_steps_and_checks_the_shard_argument(
    embeddings, pipeline_dir, tiny_digits, tmp_path, capsys
):
    import json

    sample = json.dumps(SAMPLE)
    shard_csv = str(tmp_path / "s.csv")

    def generate(shard: str, settings: str) -> int:
        return main(
            ["synth-generate", "--embeddings", str(embeddings), "--pipeline", str(pipeline_dir)]
            + ["--root", str(tmp_path), "--shard", shard, "--out", shard_csv]
            + ["--settings", settings, "--device", "cpu"]
        )

    with pytest.raises(SystemExit):
        generate("1x2", sample)
    assert "expected INDEXofCOUNT like 1of4, got '1x2'" in capsys.readouterr().err
    assert generate("1of1", sample) == 0
    out = tmp_path / "set" / "manifest.csv"
    collect_args = ["synth-collect", "--shards", shard_csv, "--root", str(tmp_path)]
    collect_args += ["--id-manifest", str(tiny_digits / "manifest.csv"), "--out", str(out)]
    assert main([*collect_args, "--settings", sample]) == 0
    assert len(read_manifest(out.parent)) == 9
    assert generate("1of1", '{"steps": 0}') == 1
    assert "synthesis setting steps: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*collect_args, "--settings", '{"stepz": 1}']) == 1
    assert "unknown sampler setting(s) ['stepz']" in capsys.readouterr().err


def test_embed_is_repeatable_whatever_the_global_random_state(
    embeddings, pipeline_dir, tiny_digits, tmp_path
):
    """The class token's randomly initialised row must not leak into the learned norms."""
    again = tmp_path / "again.pt"
    torch.manual_seed(12345)  # another global random state than the first run's
    emb.embed(tiny_digits, pipeline_dir, again, emb.EmbedSettings(**EMBED), device="cpu", threads=1)
    first, second = (torch.load(p, weights_only=True) for p in (embeddings, again))
    for key in ("class_embeddings", "vectors", "knn_distance"):
        assert torch.equal(first[key], second[key]), key
