"""Group-softmax heads (MOS): the class grouping, the logit layout, decoding.

The head's logits are consecutive groups; group g holds |g| + 1 logits: its
"others" class at position 0, then its classes in the order the grouping
lists them. A softmax runs within each group. numpy only: the tables decode
predictions without torch.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_groups(groups, num_classes: int) -> list[list[int]]:
    """The grouping as lists of class ids; every class 0..num_classes-1 exactly once."""
    if not isinstance(groups, list | tuple) or not groups:
        raise ValueError(f"groups must be a non-empty list of lists of class ids, got {groups!r}")
    seen: dict[int, int] = {}
    result = []
    for g, members in enumerate(groups):
        if not isinstance(members, list | tuple) or not members:
            raise ValueError(f"group {g} must be a non-empty list of class ids, got {members!r}")
        for c in members:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"group {g}: {c!r} is not a class id in 0..{num_classes - 1}")
            if c in seen:
                raise ValueError(f"class {c} is in group {seen[c]} and group {g}")
            seen[c] = g
        result.append([int(c) for c in members])
    missing = sorted(set(range(num_classes)) - set(seen))
    if missing:
        raise ValueError(f"classes {missing[:10]} are in no group")
    return result


def group_sizes(groups: list[list[int]]) -> list[int]:
    """Logits per group, "others" included."""
    return [len(members) + 1 for members in groups]


def class_log_probs(logits: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """(N, C) within-group log-probability of each class; its argmax is MOS's prediction
    (the class with the highest probability in its own group)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] != sum(group_sizes(groups)):
        raise ValueError(
            f"logits have {logits.shape[1]} columns, the groups need {sum(group_sizes(groups))}"
        )
    out = np.empty((len(logits), sum(len(m) for m in groups)))
    start = 0
    for members in groups:
        block = _log_softmax(logits[:, start : start + len(members) + 1])
        out[:, members] = block[:, 1:]
        start += len(members) + 1
    return out
