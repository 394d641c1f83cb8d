"""Workflow overhead: Snakemake's DAG build and no-op rerun for the full matrix.

The full matrix is every real benchmark config (config/*.yaml except the
demo) merged into one config, with every registered training method and 3
seeds, and every scorer the configs list. Timed, each as a fresh
`snakemake -n` process (best of --repeats):

- **baseline**: `snakemake -n` of a one-rule Snakefile: Snakemake's own
  start-up, the floor of any run;
- **plan**: the full matrix on an empty results folder (DAG build, every
  job planned);
- **no-op**: the full matrix with every output present and up to date (what
  a rerun after a finished run costs, as a dry run): must plan nothing.

Target (issue 5): plan and no-op each under 10 s on the build machine.
Reported as seconds and as ratios to the baseline measured in the same run.
Writes results/benchmarks/workflow/workflow_overhead[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, md_table, timed, write_result

RESULTS = ROOT / "results" / "benchmarks" / "workflow"
TARGET_SECONDS = 10.0
# Rules in dependency order: outputs of a later rule get a later mtime.
RULE_ORDER = ["fetch", "curate_dataset", "audit", "train", "features", "score"]
RULE_ORDER += ["benchmark_table", "tables"]
# What methods that train on outliers (oe, ...) get in the full matrix: the real
# configs' auxiliary set (defined in the long-tailed CIFAR configs).
OUTLIER_SET = "tinyimages_300k"
TOKEN_BACKBONE = "beit_b16_224"  # mood, where a config gives it no backbone
GROUPS_FILE = "data/raw/mos_groups.json"  # mos, where a config gives it no groups


def real_configs() -> list[Path]:
    return sorted(p for p in (ROOT / "config").glob("*.yaml") if p.name != "config.yaml")


def full_matrix(configs: list[Path], methods: list[str], seeds: list[int]) -> dict:
    """One config holding every benchmark of `configs`, with `methods` and `seeds`."""
    merged: dict = {"downloads": {}, "datasets": {}, "benchmarks": {}}
    for path in configs:
        config = yaml.safe_load(path.read_text())
        for key, value in config.items():
            if key not in merged:
                merged[key] = value
                continue
            if not isinstance(merged[key], dict):
                continue
            for name, spec in value.items():
                if name in merged[key] and merged[key][name] != spec:
                    raise ValueError(f"{path}: {key}.{name} differs from another config's")
                merged[key][name] = spec
    from ood.train import METHOD_TEACHER, METHOD_TOKENS, method_needs_outliers

    if any(method_needs_outliers(m) for m in methods) and OUTLIER_SET not in merged["datasets"]:
        raise ValueError(f"no config defines the outlier set {OUTLIER_SET!r}")
    for bench in merged["benchmarks"].values():
        bench["methods"] = {m: dict(bench["methods"].get(m, {})) for m in methods}
        for method, spec in bench["methods"].items():
            if method_needs_outliers(method):
                spec.setdefault("outliers", OUTLIER_SET)
            # What a method cannot run without, where its benchmark's config has none.
            if method in METHOD_TEACHER:
                spec.setdefault("teacher", "ce")
            if method in METHOD_TOKENS:
                spec.setdefault("backbone", TOKEN_BACKBONE)
            if method == "mos":
                spec.setdefault("train", {}).setdefault("method_params", {}).setdefault(
                    "groups", GROUPS_FILE
                )
        bench["seeds"] = seeds
    return merged


def provide_user_files(workdir: Path, config: dict) -> None:
    """Empty stand-ins for the weights and group files the configs point at."""
    from ood.config import user_files

    for bench in config["benchmarks"].values():
        for path in user_files(bench):
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).touch()
            # Older than every output make_outputs stamps: they predate the run.
            os.utime(workdir / path, (1_600_000_000, 1_600_000_000))


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(bin_dir / "snakemake"), "--cores", "1", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    text = result.stdout + result.stderr
    counts = {r: int(n) for r, n in re.findall(r"^(\w+)\s+(\d+)$", text, flags=re.M)}
    counts.pop("total", None)
    return counts


def make_outputs(workdir: Path) -> int:
    """Create every output of the plan (empty), later rules newer: a finished run."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "results/tables/all.csv", "-n"]
        + ["--cores", "1", "--configfile", "config/full.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    created, rule = 0, None
    for line in result.stdout.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif (match := re.match(r"\s+output: (.+)$", line)) and rule in RULE_ORDER:
            stamp = 1_700_000_000 + 1000 * RULE_ORDER.index(rule)
            for name in match.group(1).split(", "):
                path = workdir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                os.utime(path, (stamp, stamp))
                created += 1
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per benchmark")
    parser.add_argument(
        "--quick", action="store_true", help="one benchmark config, one seed, one repeat"
    )
    parser.add_argument("--threads", type=int, default=None, help="ignored (Snakemake is serial)")
    args = parser.parse_args(argv)
    from ood.train import METHODS

    configs = real_configs()[:1] if args.quick else real_configs()
    seeds = list(range(1 if args.quick else args.seeds))
    repeats = 1 if args.quick else args.repeats
    config = full_matrix(configs, sorted(METHODS), seeds)

    with tempfile.TemporaryDirectory(prefix="oodbench-overhead-") as tmp:
        work = Path(tmp) / "full"
        base = Path(tmp) / "baseline"
        work.mkdir()
        for name in ("Snakefile", "workflow", "config", "envs"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
        (work / "config/full.yaml").write_text(yaml.safe_dump(config))
        provide_user_files(work, config)
        base.mkdir()
        (base / "Snakefile").write_text('rule one:\n    output: "x"\n    shell: "touch {output}"\n')

        def best(workdir: Path, *target: str) -> tuple[float, subprocess.CompletedProcess]:
            runs = [timed(lambda: snakemake(workdir, *target)) for _ in range(repeats)]
            return min(runs, key=lambda r: r[0])

        # Targets first: --quiet takes any number of values.
        target = ("results/tables/all.csv", "--configfile", "config/full.yaml")
        baseline, _ = best(base, "x", "-n", "--quiet", "rules")
        # --quiet rules: printing the list of thousands of jobs is not what is measured.
        plan_s, plan = best(work, *target, "-n", "--quiet", "rules")
        jobs = planned(plan)
        files = make_outputs(work)
        # Dry as well: a benchmark never runs a job, even if a file were missed.
        noop_s, noop = best(work, *target, "-n")
        leftover = planned(noop)

    total = sum(jobs.values())
    rows = [
        ["baseline (one-rule Snakefile)", f"{baseline:.2f}", "1.00", "1"],
        ["plan: full matrix, nothing built", f"{plan_s:.2f}", f"{plan_s / baseline:.2f}", total],
        ["no-op: full matrix, all built", f"{noop_s:.2f}", f"{noop_s / baseline:.2f}", 0],
    ]
    benchmarks = ", ".join(sorted(config["benchmarks"]))
    markdown = (
        "# Workflow overhead (`snakemake -n`)\n\n"
        f"Full matrix: {len(config['benchmarks'])} benchmarks ({benchmarks}), methods "
        f"{', '.join(sorted(METHODS))}, {len(seeds)} seed(s); {total} jobs "
        f"({', '.join(f'{r} {n}' for r, n in sorted(jobs.items()))}). Best of {repeats}.\n\n"
        + md_table(["run", "seconds", "x baseline", "jobs"], rows)
        + f"\nTarget: plan and no-op under {TARGET_SECONDS:.0f} s each.\n"
    )
    payload = {
        "configs": [p.name for p in configs],
        "methods": sorted(METHODS),
        "seeds": seeds,
        "repeats": repeats,
        "jobs": jobs,
        "outputs_created": files,
        "seconds": {"baseline": baseline, "plan": plan_s, "noop": noop_s},
        "ratio_to_baseline": {"plan": plan_s / baseline, "noop": noop_s / baseline},
        "target_seconds": TARGET_SECONDS,
    }
    json_path, md_path = write_result("workflow_overhead", args.quick, payload, markdown, RESULTS)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    if leftover or "Nothing to be done" not in noop.stdout + noop.stderr:
        print(f"no-op run still plans jobs: {leftover}", file=sys.stderr)
        return 1
    if not args.quick and max(plan_s, noop_s) > TARGET_SECONDS:
        print(f"over the {TARGET_SECONDS:.0f} s target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
