"""Download + curation through the workflow's own rules, from a loopback HTTP server.

A small CIFAR-10 tarball and an SVHN .mat in the real formats are served on
127.0.0.1; Snakemake fetches (pooch, sha256) and curates them with the
config's rules, and a bad checksum stops the run with nothing left behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from http_server import FileServer

from ood.data.manifest import load_images, read_manifest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PER_CLASS_TRAIN, PER_CLASS_TEST = 6, 2


def cifar10_tarball() -> tuple[bytes, np.ndarray]:
    """cifar-10-python.tar.gz with 5 train batches and a test batch (pickles as released)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), PER_CLASS_TRAIN)
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name: str, batch: dict) -> None:
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for b, rows in enumerate(np.array_split(np.arange(len(labels)), 5)):
            add(f"data_batch_{b + 1}", {b"labels": labels[rows].tolist(), b"data": data[rows]})
        test_labels = np.repeat(np.arange(10), PER_CLASS_TEST).tolist()
        test = rng.integers(0, 256, size=(len(test_labels), 3072), dtype=np.uint8)
        add("test_batch", {b"labels": test_labels, b"data": test})
    return buffer.getvalue(), data


def svhn_mat() -> bytes:
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat(np.arange(1, 11), 4)).reshape(-1, 1)  # 10 means digit 0
    x = rng.integers(0, 256, size=(32, 32, 3, len(y)), dtype=np.uint8)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x, "y": y})
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture
def served(tmp_path):
    cifar, train_pixels = cifar10_tarball()
    mat = svhn_mat()
    with FileServer() as server:
        server.files["/cifar-10-python.tar.gz"] = cifar
        server.files["/test_32x32.mat"] = mat
        config = {
            "downloads": {
                "cifar10_python": {
                    "url": server.url("/cifar-10-python.tar.gz"),
                    "sha256": sha(cifar),
                    "format": "tar.gz",
                },
                "svhn_test": {
                    "url": server.url("/test_32x32.mat"),
                    "sha256": sha(mat),
                    "format": "file",
                },
            },
            "datasets": {
                "cifar10": {
                    "source": "cifar",
                    "inputs": {"archive": "cifar10_python"},
                    "params": {"variant": 10},
                },
                "svhn": {
                    "source": "svhn",
                    "inputs": {"archive": "svhn_test"},
                    "params": {"per_label": 3},
                    "stated_size": 30,
                },
            },
            "benchmarks": {
                "ingest": {
                    "id_dataset": "cifar10",
                    "ood": {"far": ["svhn"]},
                    "backbone": "resnet18_32_pool",
                    "methods": {"ce": {}},
                    "scorers": {"msp": {}},
                }
            },
        }
        for name in ("Snakefile", "workflow", "config", "envs"):
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
        yield tmp_path, server, config, train_pixels


def write_config(workdir: Path, config: dict) -> str:
    (workdir / "ingest.yaml").write_text(yaml.safe_dump(config))
    return "ingest.yaml"


TARGETS = ("resources/data/cifar10/manifest.csv", "resources/data/svhn/manifest.csv")


def test_fetch_and_curate_from_loopback(served):
    workdir, server, config, train_pixels = served
    result = run_snakemake(workdir, *TARGETS, "--configfile", write_config(workdir, config))
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_manifest(workdir / "resources/data/cifar10")
    assert sum(r.split == "train" for r in rows) == 10 * PER_CLASS_TRAIN
    assert sum(r.split == "test" for r in rows) == 10 * PER_CLASS_TEST
    images, _, _ = load_images(workdir / "resources/data/cifar10", split="train")
    first = train_pixels[0].reshape(3, 32, 32).transpose(1, 2, 0)  # channel-major rows
    assert np.array_equal(images[0], first)

    svhn = read_manifest(workdir / "resources/data/svhn")
    assert len(svhn) == 30 and sorted({r.label for r in svhn}) == list(range(10))
    fetched = yaml.safe_load((workdir / "resources/downloads/svhn_test/.fetch.json").read_text())
    assert fetched["sha256"] == config["downloads"]["svhn_test"]["sha256"]

    # A rerun plans nothing and asks the server for nothing.
    before = len(server.hits("/cifar-10-python.tar.gz"))
    again = run_snakemake(workdir, *TARGETS, "-n", "--configfile", "ingest.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len(server.hits("/cifar-10-python.tar.gz")) == before


def test_checksum_mismatch_stops_with_nothing_left(served):
    workdir, _, config, _ = served
    config["downloads"]["svhn_test"]["sha256"] = "0" * 64
    result = run_snakemake(workdir, TARGETS[1], "--configfile", write_config(workdir, config))
    assert result.returncode != 0
    log = (workdir / "results/logs/downloads/svhn_test.log").read_text()
    assert "sha256 mismatch: expected " + "0" * 64 in log
    assert not (workdir / "resources/downloads/svhn_test").exists()
    assert not (workdir / "resources/data/svhn").exists()
    leftovers = [p.name for p in (workdir / "resources/downloads").iterdir() if "partial" in p.name]
    assert leftovers == []
