"""Score feature dumps with one scorer (fitted once) and write the score dumps.

Only what the scorer's `needs` names is read: dump-only scorers never touch
the checkpoint; "head" reads the classifier's weights from it without
building the network; "model" builds the network and loads the images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ood import __version__
from ood.io import FeatureSet, ScoreSet, read_features, sha256_file, write_scores
from ood.scores import get_scorer
from ood.scores.base import VIEWS, Extras, Head


def read_head(checkpoint: str | os.PathLike) -> Head:
    """The classifier weight and bias of a training run's checkpoint (no network built)."""
    import torch

    from ood.models.specs import BACKBONES

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    prefix = BACKBONES[blob["meta"]["backbone"]].head
    try:
        weight, bias = (blob["model"][f"{prefix}.{part}"] for part in ("weight", "bias"))
    except KeyError as exc:
        raise ValueError(f"{path}: no classifier {exc.args[0]!r} in the checkpoint") from None
    # BiT's classifier is a 1x1 conv: its (K, D, 1, 1) weight is the (K, D) linear map.
    weight = weight.reshape(weight.shape[0], -1)
    return Head(weight=weight.double().numpy(), bias=bias.double().numpy())


def images_for(dump: FeatureSet, dataset_dir: str | os.PathLike, where: str, network=None):
    """The images of a dump's rows, in the dump's row order, from the dataset it was made from.

    A uint8 (N, H, W, 3) array; for a model trained on streamed images, a
    `StreamedImages` of the same eval views the features saw, decoded per batch.
    """
    from ood.data.manifest import load_images
    from ood.data.views import StreamedImages

    split = dump.metadata.get("split")
    if split not in ("train", "test"):
        raise ValueError(f"{where}: the dump's metadata names no split (got {split!r})")
    if network is not None and network.streamed:
        images = StreamedImages(dataset_dir, split, network.input_size, verify=True)
        index = images.index
    else:
        images, _, index = load_images(dataset_dir, split=split)
    position = {int(i): row for row, i in enumerate(index)}
    try:
        rows = [position[int(i)] for i in dump.index]
    except KeyError as exc:
        raise ValueError(
            f"{where}: dump row index {exc.args[0]} is not in {dataset_dir} ({split} split); "
            "was the dump made from another dataset?"
        ) from None
    return images[rows] if isinstance(images, np.ndarray) else images.take(rows)


def score_dumps(
    scorer: str,
    params: dict[str, Any] | None,
    tests: list[tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike | None]],
    train_path: str | os.PathLike | None = None,
    threads: int | None = None,
    *,
    variant: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    train_data: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 64,
) -> list[ScoreSet]:
    """Fit `scorer` once on the ID train dump (if it fits), then score every test dump.

    `tests` lists (test dump, score dump to write, dataset directory or None):
    the directory gives the images to scorers needing the model. `checkpoint`
    serves scorers needing the head or the model; `train_data` (a dataset
    directory) gives the train images to scorers fitting on them. A train dump
    given to a scorer that does not fit is not read.
    """
    if not tests:
        raise ValueError("no test dump given: nothing to score")
    model = get_scorer(scorer, params)
    needs = set(model.needs)
    metadata = {
        "scorer": scorer,
        "variant": variant or scorer,
        "params": json.dumps(model.params, sort_keys=True),
        "ood_version": __version__,
    }
    columns = tuple(c for c in ("logits", "feature") if c in needs)
    extra = (VIEWS,) if VIEWS in needs else ()

    head = network = None
    if needs & {"head", "model"}:
        if checkpoint is None:
            raise ValueError(f"scorer {scorer!r} needs the model checkpoint; give checkpoint")
        metadata["checkpoint_sha256"] = sha256_file(checkpoint)
        if "head" in needs:
            head = read_head(checkpoint)
        if "model" in needs:
            from ood.scores.network import Network

            lacking = [str(test) for test, _, data in tests if data is None]
            if lacking:
                raise ValueError(f"scorer {scorer!r} needs the images of {lacking[0]}")
            network = Network.from_checkpoint(
                checkpoint, device=device, batch_size=batch_size, threads=threads
            )

    if model.fits:
        if train_path is None:
            raise ValueError(f"scorer {scorer!r} fits on the ID train dump; give train_path")
        train = read_features(train_path, columns=columns, extra=extra)
        train_images = None
        if network is not None and model.fit_images:
            if train_data is None:
                raise ValueError(f"scorer {scorer!r} fits on the train images; give train_data")
            train_images = images_for(train, train_data, str(train_path), network)
        model.fit(train, threads=threads, extras=Extras(head, network, train_images))
        del train, train_images  # hold one dataset beyond the fitted state, not two
        metadata["train_path"] = str(train_path)
        metadata["train_sha256"] = sha256_file(train_path)

    results = []
    for test_path, out_path, test_data in tests:
        test = read_features(test_path, columns=columns, extra=extra)
        images = None if network is None else images_for(test, test_data, str(test_path), network)
        scores = ScoreSet(
            index=test.index,
            label=test.label,
            score=model.score(test, extras=Extras(head, network, images)),
            metadata={
                **metadata,
                "test_path": str(test_path),
                "test_sha256": sha256_file(test_path),
                **{f"features.{key}": str(value) for key, value in test.metadata.items()},
            },
        )
        write_scores(out_path, scores)
        results.append(scores)
        del test, images
    return results


def score_dump(
    scorer: str,
    params: dict[str, Any] | None,
    test_path: str | os.PathLike,
    out_path: str | os.PathLike,
    train_path: str | os.PathLike | None = None,
    threads: int | None = None,
    *,
    test_data: str | os.PathLike | None = None,
    **options: Any,
) -> ScoreSet:
    """score_dumps for one test dump (`test_data`: its dataset directory, if needed)."""
    (scores,) = score_dumps(
        scorer, params, [(test_path, out_path, test_data)], train_path, threads, **options
    )
    return scores
