"""envs/*.yaml, statically: conda cannot be installed on the build machines, so CI
never passes `--sdm conda`; these tests are what keeps the env files honest.

- every env file parses and has the expected shape (python 3.11, pip, pinned pip
  list ending with `..`, the repository itself);
- every pin agrees with pyproject.toml, and every runtime dependency of
  pyproject.toml is in some env (or is needed only where Snakemake itself runs);
- every rule's `conda:` names an existing env file, and the env of each rule
  that runs `ood <subcommand>` holds what that subcommand imports.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
RULE_FILES = sorted((REPO / "workflow/rules").glob("*.smk"))

# What each `ood` subcommand needs installed (distribution names). torchvision:
# timm imports it. test_required_packages_cover_the_imports checks this table
# against the package's own imports, so it cannot silently fall behind.
REQUIRED = {
    "fetch": {"numpy", "pooch", "pyarrow", "requests", "tqdm"},
    "curate": {
        "numpy",
        "pillow",
        "pyarrow",
        "scikit-image",
        "scikit-learn",
        "scipy",
        "tqdm",
    },
    "audit": {"faiss-cpu", "numpy", "pillow", "pyarrow", "tqdm"},
    "train": {"numpy", "pillow", "pyarrow", "timm", "torch", "torchvision", "tqdm"},
    "features": {"numpy", "pillow", "pyarrow", "scipy", "timm", "torch", "torchvision", "tqdm"},
    "score": {
        "faiss-cpu",
        "numpy",
        "pillow",
        "pyarrow",
        "scikit-learn",
        "scipy",
        "timm",
        "torch",
        "torchvision",
        "tqdm",
    },
    "tables": {"numpy", "pandas", "pyarrow", "scikit-learn"},
    **{
        f"synth-{step}": {
            "accelerate",  # diffusers loads SD v1.4 with it
            "diffusers",
            "numpy",
            "pillow",
            "pyarrow",
            "timm",
            "torch",
            "torchvision",
            "tqdm",
            "transformers",
        }
        for step in ("pipeline", "embed", "generate", "collect")
    },
    "concat-tables": {"numpy", "pandas", "pyarrow", "scikit-learn"},
}
# Runtime dependencies no rule env needs: Snakemake parses the workflow (and
# validates the config through ood.config) in the environment it runs in.
DRIVER_ONLY = {
    "snakemake": "runs the workflow",
    "jsonschema": "config validation at parse time (ood.config from common.smk)",
    "pyyaml": "config loading at parse time (ood.config from common.smk)",
}
# Pinned in pyproject.toml but imported nowhere in ood/ yet; once something
# imports it, test_not_yet_imported_is_still_true fails: add it to the env
# of the rule that uses it and remove it from here.
NOT_YET_IMPORTED = {"matplotlib"}
# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "PIL": "pillow",
    "faiss": "faiss-cpu",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def normalize(name: str) -> str:
    """PEP 503 name: Pillow, PyYAML and scikit_learn compare as pillow, pyyaml, scikit-learn."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str], where: str) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"{where}: {requirement!r} is not pinned as name==version"
        found[normalize(match[1])] = match[2]
    return found


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def runtime_pins() -> dict[str, str]:
    return pins(pyproject()["dependencies"], "pyproject.toml [project] dependencies")


def all_pins() -> dict[str, str]:
    """Runtime pins plus every optional extra's (test, slurm, ...)."""
    found = runtime_pins()
    for extra, requirements in pyproject().get("optional-dependencies", {}).items():
        found.update(pins(requirements, f"pyproject.toml optional-dependencies.{extra}"))
    return found


def load_env(path: Path) -> dict:
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict), f"{path.name}: not a YAML mapping"
    return env


def env_pip(path: Path) -> list[str]:
    """The pip list of an env file (its shape is checked by test_env_file_shape)."""
    for dep in load_env(path).get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            return [str(item) for item in dep["pip"]]
    return []


def env_pins(path: Path) -> dict[str, str]:
    return pins([item for item in env_pip(path) if item != ".."], f"envs/{path.name}")


def rules() -> dict[str, dict]:
    """Rule name -> {file, conda (path as written), subcommand (of `ood ...` in shell:),
    resources (the literal integer ones)}.

    Parsed from the snakefmt-formatted text: a rule runs from `rule NAME:` to the
    next line at column 0; directive bodies are indented under the directive.
    """
    found = {}
    for path in RULE_FILES:
        text = path.read_text()
        starts = list(re.finditer(r"^rule (\w+):\s*$", text, flags=re.M))
        for match in starts:
            end = re.compile(r"^\S", flags=re.M).search(text, match.end())
            body = text[match.end() : end.start() if end else len(text)]
            conda = re.search(r"^    conda:\s*\n\s+\"([^\"]+)\"", body, flags=re.M)
            shell = re.search(r"^    shell:\s*\n((?:        .*\n?)+)", body, flags=re.M)
            command = re.search(r"(?<![\w/.-])ood ([\w-]+)", shell[1]) if shell else None
            resources = re.search(r"^    resources:\s*\n((?:        .*\n?)+)", body, flags=re.M)
            found[match[1]] = {
                "file": path,
                "conda": conda[1] if conda else None,
                "subcommand": command[1] if command else None,
                # literal integer resources (mem_mb=8000); callables are left out
                "resources": {
                    key: int(value)
                    for key, value in re.findall(r"^\s+(\w+)=(\d+),$", resources[1], flags=re.M)
                }
                if resources
                else {},
            }
    return found


# --- the env files themselves ---------------------------------------------------------


def test_env_files_exist():
    assert ENV_FILES, "no envs/*.yaml"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_shape(path):
    env = load_env(path)
    name = f"envs/{path.name}"
    assert env.get("channels"), f"{name}: no channels"
    assert "nodefaults" in env["channels"], f"{name}: channels must end with nodefaults"
    deps = env.get("dependencies")
    assert isinstance(deps, list), f"{name}: no dependencies list"
    conda = [dep for dep in deps if isinstance(dep, str)]
    assert "python=3.11" in conda, f"{name}: needs python=3.11 (pyproject requires-python)"
    assert "pip" in conda, f"{name}: needs pip among its conda dependencies"
    pip_lists = [dep["pip"] for dep in deps if isinstance(dep, dict) and "pip" in dep]
    assert len(pip_lists) == 1, f"{name}: needs exactly one `- pip:` list"
    (pip,) = pip_lists
    assert pip and pip[-1] == "..", f"{name}: the pip list must end with `..` (the ood package)"
    assert (path.parent / ".." / "pyproject.toml").is_file(), f"{name}: `..` is not the repo"
    assert pip.count("..") == 1, f"{name}: `..` listed twice"
    env_pins(path)  # every other entry is name==version


def test_requires_python_matches_the_envs():
    assert pyproject()["requires-python"] == ">=3.11,<3.12", (
        "pyproject.toml requires-python changed: update python=3.11 in envs/*.yaml and here"
    )


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(path):
    expected = all_pins()
    for package, version in env_pins(path).items():
        assert package in expected, (
            f"envs/{path.name}: {package}=={version} is not pinned in pyproject.toml"
        )
        assert version == expected[package], (
            f"envs/{path.name}: {package}=={version} but pyproject.toml pins "
            f"{package}=={expected[package]}"
        )


def test_every_runtime_dependency_is_in_some_env():
    in_envs = {package for path in ENV_FILES for package in env_pins(path)}
    for package in runtime_pins():
        if package in DRIVER_ONLY or package in NOT_YET_IMPORTED:
            continue
        assert package in in_envs, (
            f"pyproject.toml dependency {package} is in no envs/*.yaml: add it to the env "
            "of the rules that import it"
        )
    for package in {*DRIVER_ONLY, *NOT_YET_IMPORTED}:
        assert package in runtime_pins(), f"{package} is no longer a dependency: drop it here"


# --- rules -> env files -----------------------------------------------------------------


def test_rules_parsed():
    found = rules()
    assert {"train", "features", "score", "tables"} <= set(found), sorted(found)


def test_every_conda_directive_points_at_an_env_file():
    for name, rule in rules().items():
        where = f"{rule['file'].relative_to(REPO)} rule {name}"
        assert rule["conda"], f"{where}: no conda: directive"
        # Snakemake resolves conda: paths relative to the file that holds the rule.
        env = (rule["file"].parent / rule["conda"]).resolve()
        assert env.is_file(), f"{where}: conda: {rule['conda']} does not exist"
        assert env.parent == REPO / "envs", f"{where}: conda: {rule['conda']} is not in envs/"


def test_every_ood_subcommand_has_a_requirements_entry():
    subcommands = {rule["subcommand"] for rule in rules().values() if rule["subcommand"]}
    assert subcommands == set(REQUIRED), (
        f"rules run `ood` {sorted(subcommands)}; REQUIRED in {Path(__file__).name} "
        f"lists {sorted(REQUIRED)}"
    )


def test_rule_envs_hold_what_their_subcommand_imports():
    for name, rule in rules().items():
        if not rule["subcommand"]:
            continue
        env = (rule["file"].parent / rule["conda"]).resolve()
        missing = REQUIRED[rule["subcommand"]] - set(env_pins(env))
        assert not missing, (
            f"envs/{env.name} (rule {name}: `ood {rule['subcommand']}`) lacks "
            f"{', '.join(sorted(missing))}"
        )


# --- REQUIRED against the package's imports ---------------------------------------------


def module_file(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_nodes(tree: ast.AST, lazy: bool):
    """Import statements of a module; with lazy=False only those that run when it is
    imported (not those inside functions, which run only if the function is called)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif lazy or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from import_nodes(node, lazy)


def imports_of(module: str, lazy: bool) -> set[str]:
    """Modules that `module` imports (see import_nodes for `lazy`)."""
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in import_nodes(ast.parse(path.read_text()), lazy):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
            found |= {source} | {f"{source}.{a.name}" for a in node.names}
        else:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def scorer_families() -> list[str]:
    """ood.scores imports its family modules by name (importlib): read the list."""
    tree = ast.parse((REPO / "ood/scores/__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FAMILIES" for t in node.targets
        ):
            return [f"ood.scores.{name}" for name in ast.literal_eval(node.value)]
    raise AssertionError("ood/scores/__init__.py: FAMILIES not found")


def third_party_imports(start: set[str], lazy: bool = False) -> set[str]:
    """Top-level third-party modules that importing `start` loads, following ood's
    own modules (`lazy`: also imports inside functions, see import_nodes)."""
    seen, todo, external = set(), list(start), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        top = module.split(".")[0]
        if top != "ood":
            if top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
            continue
        if not module_file(module):  # `from ood.x import name`: name is no module
            continue
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        if module == "ood.scores":
            todo += scorer_families()
        todo += imports_of(module, lazy)
    return external


def subcommand_modules() -> dict[str, set[str]]:
    """Subcommand -> modules it loads: ood/cli.py's top-level imports plus those
    inside its cmd_<subcommand> function (ood/cli.py itself imports stages lazily)."""
    tree = ast.parse((REPO / "ood/cli.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            top_level.add(node.module)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
            inside = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
            inside |= {a.name for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names}
            # cmd_concat_tables runs `ood concat-tables`
            found[node.name.removeprefix("cmd_").replace("_", "-")] = top_level | inside
    return found


def test_required_packages_cover_the_imports():
    pinned = set(runtime_pins())
    modules = subcommand_modules()
    for subcommand, required in REQUIRED.items():
        assert subcommand in modules, f"ood/cli.py has no cmd_{subcommand}"
        imported = {
            normalize(DISTRIBUTION.get(top, top))
            for top in third_party_imports(modules[subcommand])
        }
        missing = (imported & pinned) - required
        assert not missing, (
            f"`ood {subcommand}` imports {', '.join(sorted(missing))}: add to "
            f"REQUIRED[{subcommand!r}] in {Path(__file__).name} and to the rule's env file"
        )


def package_modules() -> set[str]:
    """Every module of the ood package, dotted."""
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "ood").rglob("*.py")
    }


def test_not_yet_imported_is_still_true():
    imported = {
        normalize(DISTRIBUTION.get(top, top))
        for top in third_party_imports(package_modules(), lazy=True)
    }
    for package in NOT_YET_IMPORTED:
        assert package not in imported, (
            f"ood now imports {package}: add it to the env file of the rule that uses it "
            f"and remove it from NOT_YET_IMPORTED in {Path(__file__).name}"
        )
