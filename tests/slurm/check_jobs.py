"""Check what SLURM was asked for in `make test-slurm`, from `scontrol show job -o`.

The executor plugin puts `rule_<rule>_wildcards_<...>` in each job's comment.
GPUs (TresPerJob gres:gpu) must reach exactly the jobs that run the model:
synthesis embed and generate, train, features and the score jobs of the model
scorers; every other job
must ask for none. Also prints the jobs per rule with their CPUs and memory.
"""

import argparse
import re
import subprocess
import sys
from collections import Counter

from ood.scores import SCORERS

MODEL_SCORERS = sorted(name for name, s in SCORERS.items() if "model" in s.needs)
GPU_RULES = {"synth_embed", "synth_generate", "train", "features"}


def parse(text: str) -> list[dict[str, str]]:
    """One dict per job line of `scontrol show job -o` (KEY=VALUE fields)."""
    jobs = []
    for line in text.splitlines():
        if line.startswith("JobId="):
            jobs.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return jobs


def wants_gpu(rule: str, comment: str) -> bool:
    if rule == "score":
        return any(f"_{name}" in comment for name in MODEL_SCORERS)
    return rule in GPU_RULES


def problems(jobs: list[dict[str, str]]) -> list[str]:
    found = []
    for job in jobs:
        comment = job.get("Comment", "")
        match = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
        if not match:
            found.append(f"job {job['JobId']}: no rule in comment {comment!r}")
            continue
        rule = match.group(1)
        has_gpu = "gpu" in job.get("TresPerJob", "")
        if job.get("JobState") != "COMPLETED":
            found.append(f"job {job['JobId']} ({comment}): state {job.get('JobState')}")
        if has_gpu != wants_gpu(rule, comment):
            found.append(
                f"job {job['JobId']} ({comment}): TresPerJob={job.get('TresPerJob', '')!r}, "
                f"expected {'a' if not has_gpu else 'no'} GPU"
            )
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--expect-jobs", type=int, required=True, help="jobs the run submitted")
    args = parser.parse_args(argv)
    text = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    jobs = parse(text)
    rules = Counter(re.sub(r"_wildcards_.*", "", j.get("Comment", "")) for j in jobs)
    summary = {}
    for job in jobs:
        rule = re.sub(r"_wildcards_.*", "", job.get("Comment", ""))
        summary.setdefault(rule, set()).add(
            (job.get("NumCPUs"), job.get("MinMemoryNode"), job.get("TresPerJob", "-"))
        )
    for rule, count in sorted(rules.items()):
        print(f"[test-slurm]   {rule}: {count} jobs, (cpus, mem, tres) {sorted(summary[rule])}")
    found = problems(jobs)
    if len(jobs) != args.expect_jobs:
        found.append(f"scontrol lists {len(jobs)} jobs, the run submitted {args.expect_jobs}")
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
