"""What the benchmark scripts share: timing, thread caps, the environment, result files.

Benchmarks measure ratios within one run on one machine; absolute seconds
are recorded for context only. Results go to results/benchmarks/scorers/
as <name>.json and <name>.md (<name>-quick.* for a --quick run), each
written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from ood.io import write_text_atomic  # noqa: E402

RESULTS = ROOT / "results" / "benchmarks" / "scorers"


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time (time.perf_counter) of one call, and its result.

    Callers repeat and keep the best: the fastest run is the one least
    disturbed by whatever else the machine is doing.
    """
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def limit_threads(threads: int) -> Any:
    """Cap BLAS/OpenMP (threadpoolctl), faiss and torch at `threads`; keep the returned object.

    Call it after importing the libraries the benchmark uses: threadpoolctl
    only reaches libraries already loaded. faiss bundles its own OpenMP and
    BLAS and torch has its own pool, hence their explicit calls as well.
    """
    from threadpoolctl import threadpool_limits

    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threadpool_limits(limits=threads)


def environment(threads: int) -> dict[str, Any]:
    """Machine and library versions, for the result file."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in (
        "numpy",
        "faiss-cpu",
        "scikit-learn",
        "torch",
        "diffusers",
        "pytorch-ood",
        "oodbench",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{p['internal_api']} {p.get('version')} ({Path(p['filepath']).name}): "
            f"{p['num_threads']} threads"
            for p in threadpool_info()
        ]
    except ImportError:
        pools = []
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "versions": versions,
        "thread_pools": pools,
    }


def result_name(name: str, quick: bool) -> str:
    return f"{name}-quick" if quick else name


def write_result(
    name: str, quick: bool, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS
) -> tuple[Path, Path]:
    """Write <out_dir>/<name>[-quick].json and .md atomically; return both paths."""
    stem = result_name(name, quick)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    write_text_atomic(md_path, markdown)
    return json_path, md_path


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def env_markdown(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"Machine: {env['platform']}, {env['cpus']} CPUs, {env['threads']} thread(s) used; "
        f"Python {env['python']}; {versions}.\n"
    )
