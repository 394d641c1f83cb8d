"""Score one feature dump with one scorer and write the score dump."""

from __future__ import annotations

import json
import os
from typing import Any

from ood import __version__
from ood.io import ScoreSet, read_features, sha256_file, write_scores
from ood.scores import get_scorer


def score_dump(
    scorer: str,
    params: dict[str, Any] | None,
    test_path: str | os.PathLike,
    out_path: str | os.PathLike,
    train_path: str | os.PathLike | None = None,
    threads: int | None = None,
) -> ScoreSet:
    """Fit `scorer` on the ID train dump (if it fits), score the test dump, write scores.

    A train dump given to a scorer that does not fit is not read.
    """
    model = get_scorer(scorer, params)
    metadata = {
        "scorer": scorer,
        "params": json.dumps(model.params, sort_keys=True),
        "ood_version": __version__,
    }
    if model.fits:
        if train_path is None:
            raise ValueError(f"scorer {scorer!r} fits on the ID train dump; give train_path")
        model.fit(read_features(train_path, columns=model.needs), threads=threads)
        metadata["train_path"] = str(train_path)
        metadata["train_sha256"] = sha256_file(train_path)

    test = read_features(test_path, columns=model.needs)
    metadata["test_path"] = str(test_path)
    metadata["test_sha256"] = sha256_file(test_path)
    metadata.update({f"features.{key}": str(value) for key, value in test.metadata.items()})

    scores = ScoreSet(
        index=test.index, label=test.label, score=model.score(test), metadata=metadata
    )
    write_scores(out_path, scores)
    return scores
