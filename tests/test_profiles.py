"""profiles/local and profiles/slurm: their keys, and the resources Snakemake gives
each job of the demo in a dry run (`resources: ...` per job in `snakemake -n`).

The SLURM executor plugin is an optional extra, so the slurm profile is checked
statically and, minus its executor keys, through a local dry run.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from test_envs import RULE_FILES, rules
from test_workflow import copy_workflow, snakemake

from ood.scores import SCORERS
from ood.scores.variants import expand_all

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "profiles/local/config.yaml"
SLURM = REPO / "profiles/slurm/config.yaml"
GPU_RULES = {
    "synth_embed",
    "synth_generate",
    "train",
    "features",
}  # always; score only for scorers that need the model


def load(path: Path) -> dict:
    profile = yaml.safe_load(path.read_text())
    assert isinstance(profile, dict), f"{path.relative_to(REPO)}: not a YAML mapping"
    return profile


def evaluate(value, attempt: int):
    """A profile resource as Snakemake evaluates it: a number, or an expression."""
    return eval(str(value), {"attempt": attempt}) if isinstance(value, str) else value


def localrules() -> set[str]:
    names = set()
    for path in RULE_FILES:
        for block in re.findall(r"^localrules:\s*\n((?:    .*\n?)+)", path.read_text(), re.M):
            names |= set(re.findall(r"\w+", block))
    return names


def jobs(output: str) -> list[tuple[str, str, dict[str, str]]]:
    """(rule, output, resources) of every job a dry run prints."""
    found = []
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        out = re.search(r"^    output: (.*)$", body, re.M)
        resources = re.search(r"^    resources: (.*)$", body, re.M)
        assert resources, f"no resources line for a {rule} job:\n{body}"
        pairs = dict(item.split("=", 1) for item in resources[1].split(", "))
        found.append((rule, out[1] if out else "", pairs))
    assert found, output[-2000:]
    return found


def demo_model_variants() -> set[str]:
    """Variant ids of the demo whose scorer runs the model (gradients, perturbation)."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    variants = expand_all(config["benchmarks"]["demo"]["scorers"])
    return {v for v, (name, _) in variants.items() if "model" in SCORERS[name].needs}


def expected_gpu(rule: str, output: str, model_variants: set[str]) -> int:
    if rule in GPU_RULES:
        return 1
    if rule == "score":  # results/scores/<benchmark>/<method>/seed<k>/<variant>
        return int(Path(output).name in model_variants)
    return 0


# --- profiles/local ---------------------------------------------------------------------


def test_local_profile_keys():
    profile = load(LOCAL)
    assert profile["cores"] == "all"
    gpus = profile["resources"]["gpu"]
    assert isinstance(gpus, int) and gpus >= 1, f"{LOCAL.name}: resources gpu must be >= 1"
    for key in ("mem_mb", "runtime"):
        assert key in profile["default-resources"], f"profiles/local: default-resources {key}"
    assert profile["rerun-incomplete"] is True and profile["printshellcmds"] is True


def test_local_dry_run_asks_gpus_for_gpu_rules_only(tmp_path):
    """`make demo`'s command as a dry run: gpu=1 on train, features and the model
    scorers' score jobs; none elsewhere; profile defaults on the rule declaring none."""
    workdir = copy_workflow(tmp_path)
    result = snakemake(
        workdir, "-n", "--profile", "profiles/local", "--configfile", "config/config.yaml"
    )
    model_variants = demo_model_variants()
    assert model_variants >= {"odin", "gradnorm", "mahalanobis_ens", "ada_gradnorm"}
    seen = set()
    for rule, output, resources in jobs(result.stdout):
        seen.add(rule)
        gpu = int(resources.get("gpu", 0))
        assert gpu == expected_gpu(rule, output, model_variants), (rule, output, resources)
        if rule == "all":  # declares no resources: the profile's default-resources
            assert resources["mem_mb"] == "2000" and resources["runtime"] == "60", resources
    assert {"train", "features", "score", "benchmark_table", "tables", "all"} <= seen


def test_local_dry_run_on_cpu_asks_no_gpu(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(
        workdir,
        "-n",
        "--profile",
        "profiles/local",
        "--configfile",
        "config/config.yaml",
        "--config",
        "device=cpu",
    )
    asking = [(rule, out) for rule, out, res in jobs(result.stdout) if int(res.get("gpu", 0))]
    assert not asking, f"device: cpu, yet GPU requested by {asking[:5]}"


# --- profiles/slurm ---------------------------------------------------------------------


def test_slurm_profile_keys():
    profile = load(SLURM)
    assert profile["executor"] == "slurm"
    assert profile["jobs"] >= 1
    assert profile["retries"] >= 1, "retries let memory and runtime grow per attempt"
    assert profile["latency-wait"] >= 30, "shared filesystems need time to show outputs"
    assert profile["rerun-incomplete"] is True and profile["printshellcmds"] is True
    assert "resources" not in profile, "a global gpu/mem cap would throttle the cluster"
    # placeholders stay comments: a wrong account or partition fails every submission
    for key in ("slurm_account", "slurm_partition"):
        assert key not in profile["default-resources"], f"{key} must be set per site"
        assert f"# {key}:" in SLURM.read_text(), f"document {key} in {SLURM.name}"
    assert "# slurm-status-command: squeue" in SLURM.read_text()


def test_slurm_default_resources_grow_per_attempt():
    defaults = load(SLURM)["default-resources"]
    for key in ("mem_mb", "runtime"):
        assert evaluate(defaults[key], 2) > evaluate(defaults[key], 1) > 0, key


def test_slurm_set_resources_match_the_rules_and_grow():
    """Every rule that runs on the cluster gets mem_mb and runtime growing with
    `attempt`, starting at what the rule declares (so the two cannot drift)."""
    declared = rules()
    set_resources = load(SLURM)["set-resources"]
    cluster_rules = {
        name for name, rule in declared.items() if rule["resources"] and name not in localrules()
    }
    assert cluster_rules == set(set_resources), (
        f"{SLURM.relative_to(REPO)} set-resources: {sorted(set_resources)}; "
        f"rules run on the cluster: {sorted(cluster_rules)}"
    )
    for name, resources in set_resources.items():
        assert "gpu" not in resources, f"{name}: gpu comes from the rule (per scorer, device)"
        for key in ("mem_mb", "runtime"):
            first, second = evaluate(resources[key], 1), evaluate(resources[key], 2)
            assert first == declared[name]["resources"][key], (
                f"{SLURM.relative_to(REPO)}: {name} {key} at attempt 1 is {first}, "
                f"the rule declares {declared[name]['resources'][key]}"
            )
            assert second > first, f"{name} {key} does not grow with attempt"


def test_slurm_plugin_is_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    slurm = project["optional-dependencies"]["slurm"]
    assert any(req.startswith("snakemake-executor-plugin-slurm==") for req in slurm), slurm


@pytest.fixture
def slurm_profile_without_executor(tmp_path) -> Path:
    """profiles/slurm minus the keys that need the plugin: what is left runs locally."""
    profile = {
        key: value
        for key, value in load(SLURM).items()
        if key not in ("executor", "jobs") and not key.startswith("slurm-")
    }
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def test_slurm_resources_in_a_dry_run(tmp_path, slurm_profile_without_executor):
    """Snakemake accepts the profile's expressions and applies them to each job."""
    (tmp_path / "workflow").mkdir()
    workdir = copy_workflow(tmp_path / "workflow")
    result = snakemake(
        workdir,
        "-n",
        "--profile",
        str(slurm_profile_without_executor),
        "--configfile",
        "config/config.yaml",
    )
    declared = rules()
    model_variants = demo_model_variants()
    for rule, output, resources in jobs(result.stdout):
        expected = declared[rule]["resources"] if rule in declared else {}
        mem_mb, runtime = expected.get("mem_mb", 2000), expected.get("runtime", 60)
        assert (resources["mem_mb"], resources["runtime"]) == (str(mem_mb), str(runtime)), (
            rule,
            resources,
        )
        assert int(resources.get("gpu", 0)) == expected_gpu(rule, output, model_variants)


def test_slurm_profile_as_is_in_a_dry_run(tmp_path):
    """With the plugin installed, the profile itself (slurm-* keys included) parses."""
    workdir = copy_workflow(tmp_path)
    result = snakemake(
        workdir, "-n", "--profile", "profiles/slurm", "--configfile", "config/config.yaml"
    )
    model_variants = demo_model_variants()
    for rule, output, resources in jobs(result.stdout):
        assert int(resources.get("gpu", 0)) == expected_gpu(rule, output, model_variants)
