"""One forward pass per (model, dataset, split) -> one Parquet feature dump."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import ood
from ood.data.manifest import load_images, manifest_sha256
from ood.data.views import StreamedImages, trained_on_streams
from ood.io import FeatureSet, sha256_file, write_features
from ood.models.backbones import N_VIEWS, features_and_logits, load_checkpoint
from ood.models.specs import BACKBONES
from ood.scores.base import GROUPS_KEY, VIEWS
from ood.train.loop import input_size_for, select_device, to_model_input


def extract(
    checkpoint: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    split: str,
    out_path: str | os.PathLike,
    *,
    role: str,
    batch_size: int = 256,
    device: str = "auto",
    threads: int | None = None,
    context: dict | None = None,
    views: bool = False,
) -> FeatureSet:
    """Dump logits and penultimate features of every image in a split.

    `role` is "id" (labels kept) or "ood" (labels written as -1).
    `context` (benchmark, dataset name, ...) is added to the file metadata.
    `views` adds the multi-scale views column (N, 6 * D) that csd reads.
    """
    if role not in ("id", "ood"):
        raise ValueError(f"role must be 'id' or 'ood', got {role!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = select_device(device)
    model, meta = load_checkpoint(checkpoint)
    model.to(dev)
    size = BACKBONES[meta["backbone"]].input_size
    mean, std = meta["settings"]["mean"], meta["settings"]["std"]
    if trained_on_streams(meta["settings"]):  # the views the model was trained with
        images = StreamedImages(dataset_dir, split, size, threads, verify=True)
        labels, index, upsample = images.labels, images.index, None
    else:
        images, labels, index = load_images(dataset_dir, split=split)
        upsample = input_size_for(images.shape, size, f"{dataset_dir} (model {checkpoint})")

    features, logits, view_rows = [], [], []
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(images), batch_size),
            desc=f"features {os.path.basename(str(dataset_dir))}/{split}",
            file=sys.stderr,
            mininterval=2.0,
        ):
            pixels = images[start : start + batch_size]  # decoded here if streamed
            batch = to_model_input(pixels, mean, std, upsample).to(dev)
            out = features_and_logits(model, batch, views=views)
            features.append(out[0].float().cpu().numpy())
            logits.append(out[1].float().cpu().numpy())
            if views:
                view_rows.append(out[2].float().flatten(1).cpu().numpy())

    metadata = {
        "checkpoint_sha256": sha256_file(checkpoint),
        "manifest_sha256": manifest_sha256(dataset_dir),
        "ood_version": ood.__version__,
        "split": split,
        "role": role,
        "method": meta["method"],
        "backbone": meta["backbone"],
        "seed": str(meta["seed"]),
    }
    if "group_sizes" in meta:  # group-softmax models (MOS): the scorer needs the split
        metadata[GROUPS_KEY] = json.dumps(meta["group_sizes"])
    if "group_classes" in meta:  # which class each group logit is: for the tables' accuracy
        metadata["group_classes"] = json.dumps(meta["group_classes"])
    extra = {}
    if views:
        extra[VIEWS] = np.concatenate(view_rows)
        metadata["views"] = str(N_VIEWS)
    metadata.update({k: str(v) for k, v in (context or {}).items()})
    dump = FeatureSet(
        index=index,
        label=labels if role == "id" else np.full(len(labels), -1, dtype=np.int64),
        logits=np.concatenate(logits),  # load_images never returns an empty split
        feature=np.concatenate(features),
        extra=extra,
        metadata=metadata,
    )
    write_features(out_path, dump)
    return dump
