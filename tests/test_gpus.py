"""GPU choice when several GPU jobs share one machine (ood/gpus.py).

No GPU here: the lock files are exercised for real (including a lock held by
another process that is then killed), and select_device with torch.cuda's
answers replaced.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ood import gpus
from ood.train.loop import select_device


@pytest.fixture(autouse=True)
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path / "locks"))
    yield tmp_path / "locks"
    gpus.release_all()


def test_each_claim_gets_the_next_free_device(locks):
    assert [gpus.claim_device(3) for _ in range(3)] == [0, 1, 2]
    assert sorted(p.name for p in locks.iterdir()) == ["gpu0.lock", "gpu1.lock", "gpu2.lock"]


def test_all_devices_held_is_a_clear_error(locks):
    gpus.claim_device(2), gpus.claim_device(2)
    with pytest.raises(RuntimeError, match=r"all 2 visible GPUs are held .*--resources gpu=N"):
        gpus.claim_device(2)


def test_release_frees_the_devices():
    assert gpus.claim_device(2) == 0
    gpus.release_all()
    assert gpus.claim_device(2) == 0


def test_a_device_held_by_another_process_is_skipped_until_it_dies(locks):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ood import gpus; import sys, time;"
            f"gpus.claim_device(1, __import__('pathlib').Path({str(locks)!r}));"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert gpus.claim_device(2) == 1  # device 0 belongs to the other job
        gpus.release_all()
        holder.kill()  # a killed job: the kernel drops its lock
        holder.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                assert gpus.claim_device(1) == 0
                break
            except RuntimeError:
                assert time.monotonic() < deadline, "lock of the killed process not released"
                time.sleep(0.05)
    finally:
        holder.kill()


def fake_cuda(monkeypatch, count: int) -> list[int]:
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_select_device_claims_a_free_gpu_when_several_are_visible(monkeypatch):
    current = fake_cuda(monkeypatch, 3)
    assert select_device("auto") == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda", 1)
    assert current == [0, 1]


def test_select_device_with_one_gpu_takes_no_lock(monkeypatch, locks):
    current = fake_cuda(monkeypatch, 1)
    assert select_device("auto") == select_device("auto") == torch.device("cuda", 0)
    assert current == [] and not locks.exists()


def test_select_device_without_gpu(monkeypatch):
    fake_cuda(monkeypatch, 0)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device 'cuda' requested but no CUDA GPU is visible"):
        select_device("cuda")
