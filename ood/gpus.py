"""Which GPU a job uses when one machine runs several GPU jobs at once.

Snakemake's `gpu` resource only counts (profiles/local: `--resources gpu=N`);
it hands no device ids to jobs. So a job that sees more than one CUDA device
claims the first device no other oodbench job holds, through an exclusive
lock file per device, held until the process exits (the kernel drops the
lock even when the job is killed). Under SLURM each job sees only the GPUs
it was given (CUDA_VISIBLE_DEVICES), so with one visible device there is
nothing to choose and no lock is taken.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

LOCK_DIR_ENV = "OOD_GPU_LOCK_DIR"
_held: list[IO] = []  # open lock files: closing one would release its GPU


def lock_dir() -> Path:
    """Where the per-device lock files live: $OOD_GPU_LOCK_DIR or <tmp>/oodbench-gpu-locks."""
    default = Path(tempfile.gettempdir()) / "oodbench-gpu-locks"
    return Path(os.environ.get(LOCK_DIR_ENV) or default)


def claim_device(count: int, directory: Path | None = None) -> int:
    """Index of the first of `count` devices whose lock this process gets.

    Raises RuntimeError when every device is held: more GPU jobs run than
    there are GPUs, i.e. `--resources gpu=N` exceeds the machine's GPUs.
    """
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        handle = open(directory / f"gpu{index}.lock", "a")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held.append(handle)
        return index
    raise RuntimeError(
        f"all {count} visible GPUs are held by other oodbench jobs (locks in {directory}); "
        "run with --resources gpu=N no larger than the number of GPUs"
    )


def release_all() -> None:
    """Drop every lock this process holds (tests; a process's exit does the same)."""
    while _held:
        _held.pop().close()
