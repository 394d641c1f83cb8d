"""The `ood` command line, run in-process through ood.cli.main (and once as `python -m ood`)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ood import __version__
from ood.cli import main
from ood.io import FeatureSet, ScoreSet, read_scores, write_features, write_scores
from ood.scores import SCORERS
from ood.scores.run import score_dump
from ood.tables import COLUMNS

REPO = Path(__file__).resolve().parents[1]

REQUIRED = {
    "curate": ["--name", "--spec", "--out"],
    "train": ["--manifest", "--method", "--backbone", "--out", "--log-csv"],
    "features": ["--checkpoint", "--manifest", "--split", "--role", "--out"],
    "score": ["--scorer", "--test", "--out"],
    "tables": ["--benchmarks", "--csv", "--features", "--scores"],
    "concat-tables": ["--out"],
    "scorers": [],
    "methods": [],
}


@pytest.fixture
def dumps(tmp_path):
    rng = np.random.default_rng(9)
    meta = {"benchmark": "b", "method": "ce", "backbone": "r", "seed": "0", "split": "test"}
    train = FeatureSet(
        index=np.arange(30),
        label=np.arange(30) % 3,
        logits=rng.normal(size=(30, 3)),
        feature=rng.normal(size=(30, 4)),
        metadata={**meta, "dataset": "id", "split": "train"},
    )
    test = FeatureSet(
        index=np.arange(100, 112),
        label=np.array([0, 1, 2, -1] * 3),
        logits=rng.normal(size=(12, 3)),
        feature=rng.normal(size=(12, 4)),
        metadata={**meta, "dataset": "id"},
    )
    write_features(tmp_path / "train.parquet", train)
    write_features(tmp_path / "test.parquet", test)
    return tmp_path, train, test


# -- scorers ----------------------------------------------------------------------


def test_scorers_lists_registry(capsys):
    assert main(["scorers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(SCORERS)
    for line, cls in zip(lines, SCORERS.values(), strict=True):
        assert f"needs={','.join(cls.needs)}" in line
        assert f"fits={'yes' if cls.fits else 'no'}" in line


# -- score ------------------------------------------------------------------------


def test_score_logit_scorer(dumps, capsys):
    tmp_path, _, test = dumps
    out = tmp_path / "out" / "energy.parquet"
    args = ["score", "--scorer", "energy", "--params", '{"temperature": 2.0}']
    assert main([*args, "--test", str(tmp_path / "test.parquet"), "--out", str(out)]) == 0
    got = read_scores(out)
    ref = score_dump("energy", {"temperature": 2.0}, tmp_path / "test.parquet", tmp_path / "r.pq")
    assert got.score.tobytes() == ref.score.tobytes()
    np.testing.assert_array_equal(got.index, test.index)
    np.testing.assert_array_equal(got.label, test.label)
    assert got.metadata == ref.metadata
    assert json.loads(got.metadata["params"]) == {"temperature": 2.0}
    # And the numbers themselves: T * logsumexp(logits / T).
    expected = [
        2.0 * math.log(sum(math.exp(v / 2.0) for v in row))
        for row in test.logits.astype(np.float32).astype(np.float64)
    ]
    np.testing.assert_allclose(got.score, expected, rtol=1e-12)
    assert capsys.readouterr().out == ""  # nothing on stdout: logs go to stderr


def test_score_fitting_scorer(dumps):
    tmp_path, _, _ = dumps
    out = tmp_path / "maha.parquet"
    argv = ["score", "--scorer", "mahalanobis", "--test", str(tmp_path / "test.parquet")]
    argv += ["--train", str(tmp_path / "train.parquet"), "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    ref = score_dump(
        "mahalanobis",
        {},
        tmp_path / "test.parquet",
        tmp_path / "ref.parquet",
        train_path=tmp_path / "train.parquet",
    )
    got = read_scores(out)
    assert got.score.tobytes() == ref.score.tobytes()
    assert got.metadata == ref.metadata
    assert got.metadata["train_path"] == str(tmp_path / "train.parquet")


def test_score_several_sets_fits_once(dumps, monkeypatch):
    """One call scores the train dump's own rows and the test dump with one fit;
    each output equals scoring that set alone."""
    from ood.scores.distance import Mahalanobis

    tmp_path, _, _ = dumps
    fits = []
    original = Mahalanobis._fit
    monkeypatch.setattr(
        Mahalanobis, "_fit", lambda self, train: fits.append(1) or original(self, train)
    )
    sets = [tmp_path / "test.parquet", tmp_path / "train.parquet"]
    outs = [tmp_path / "s" / "a.parquet", tmp_path / "s" / "b.parquet"]
    argv = ["score", "--scorer", "mahalanobis", "--train", str(tmp_path / "train.parquet")]
    argv += ["--test", *map(str, sets), "--out", *map(str, outs)]
    assert main(argv) == 0
    assert len(fits) == 1
    for test, out in zip(sets, outs, strict=True):
        alone = score_dump("mahalanobis", {}, test, tmp_path / "alone.parquet", train_path=sets[1])
        got = read_scores(out)
        assert got.score.tobytes() == alone.score.tobytes()
        assert got.metadata["test_path"] == str(test)


def test_score_outputs_must_pair_with_tests(dumps, capsys):
    tmp_path, _, _ = dumps
    argv = ["score", "--scorer", "msp", "--test", str(tmp_path / "test.parquet")]
    argv += [str(tmp_path / "train.parquet"), "--out", str(tmp_path / "one.parquet")]
    assert main(argv) == 1
    assert "ood score: error: --out names 1 file(s) for 2 --test dump(s)" in capsys.readouterr().err
    assert not (tmp_path / "one.parquet").exists()


def test_score_bad_params_json(dumps, capsys):
    tmp_path, _, _ = dumps
    out = tmp_path / "x.parquet"
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["score", "--scorer", "knn", "--params", "{k: 3}"]
            + ["--test", str(tmp_path / "test.parquet"), "--out", str(out)]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ood score: error: argument --params: not valid JSON" in err
    assert "'{k: 3}'" in err
    assert not out.exists()


def test_score_unknown_scorer(dumps, capsys):
    tmp_path, _, _ = dumps
    out = tmp_path / "x.parquet"
    code = main(
        ["score", "--scorer", "nope", "--test", str(tmp_path / "test.parquet"), "--out", str(out)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "ood score: error: unknown scorer 'nope'; known: " + ", ".join(SCORERS) in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scorer", "knn"], "scorer 'knn' fits on the ID train dump; give train_path"),
        (["--scorer", "knn", "--params", '{"k": 0}'], "parameter 'k' must be an integer >= 1"),
        (["--scorer", "msp", "--test", "missing.parquet"], "missing.parquet: file not found"),
    ],
)
def test_score_errors_exit_1(dumps, capsys, monkeypatch, extra, message):
    tmp_path, _, _ = dumps
    monkeypatch.chdir(tmp_path)
    argv = ["score", "--test", "test.parquet", "--out", "x.parquet", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"^ood score: error: .*" + re.escape(message), err, re.M), err
    assert not (tmp_path / "x.parquet").exists()


# -- tables -----------------------------------------------------------------------


def test_tables_end_to_end(tmp_path, capsys):
    benchmarks = {"b": {"id_dataset": "id", "ood": {"near": ["n"], "far": ["f"]}}}
    id_scores, ood = [0.9, 0.8, 0.7, 0.6], {"n": [0.75, 0.5, 0.7], "f": [0.1, 0.65]}
    features = tmp_path / "feat.parquet"
    write_features(
        features,
        FeatureSet(
            index=np.arange(2),
            label=np.array([1, 0]),
            logits=np.array([[0.0, 1.0], [0.0, 1.0]]),  # predicts 1, 1: accuracy 1/2
            feature=np.zeros((2, 1)),
            metadata={"benchmark": "b", "method": "ce", "backbone": "r", "seed": "3"},
        ),
    )
    score_files = []
    for dataset, values in {"id": id_scores, **ood}.items():
        path = tmp_path / "scores" / f"{dataset}.parquet"
        meta = {
            "scorer": "msp",
            "params": "{}",
            "features.benchmark": "b",
            "features.method": "ce",
            "features.backbone": "r",
            "features.seed": "3",
            "features.dataset": dataset,
        }
        n = len(values)
        write_scores(path, ScoreSet(np.arange(n), np.zeros(n, np.int64), np.array(values), meta))
        score_files.append(str(path))

    csv = tmp_path / "tables" / "all.csv"
    argv = ["tables", "--benchmarks", json.dumps(benchmarks), "--csv", str(csv)]
    assert main([*argv, "--features", str(features), "--scores", *score_files]) == 0
    table = pd.read_csv(csv)
    assert list(table.ood_dataset) == ["f", "n"]  # sorted by group: far, near
    assert list(table.ood_group) == ["far", "near"]
    assert list(table.seed) == [3, 3] and list(table.id_acc) == [0.5, 0.5]
    # f: 0.1 below all ID, 0.65 beaten by 3 of 4 -> AUROC 7/8; n: worked in test_tables: 8.5/12.
    assert table.auroc.tolist() == pytest.approx([7 / 8, 8.5 / 12], abs=5e-7)
    # FPR95: keeping all 4 ID needs threshold 0.6; f has 0.65 above it (1/2), n has 2 of 3.
    assert table.fpr95.tolist() == pytest.approx([1 / 2, 2 / 3], abs=5e-7)
    markdown = (csv.parent / "b.md").read_text()
    assert markdown.startswith("# b: ID id\n")
    assert "| ce | r | msp | 1 | 50.00 | 70.83 / 66.67 | 87.50 / 50.00 |" in markdown


def test_tables_bad_benchmarks(tmp_path, capsys):
    csv = tmp_path / "all.csv"
    argv = ["tables", "--benchmarks", '{"b": {"id_dataset": "id"}}', "--csv", str(csv)]
    assert main([*argv, "--features", "f.parquet", "--scores", "s.parquet"]) == 1
    assert "ood tables: error: benchmark 'b': needs 'id_dataset' and 'ood'" in (
        capsys.readouterr().err
    )
    assert not csv.exists()


def test_tables_missing_score_file(tmp_path, capsys):
    csv = tmp_path / "all.csv"
    missing = tmp_path / "nope.parquet"
    argv = ["tables", "--benchmarks", '{"b": {"id_dataset": "id", "ood": {}}}']
    argv += ["--csv", str(csv), "--features", str(missing), "--scores", str(missing)]
    assert main(argv) == 1
    assert f"ood tables: error: {missing}: file not found" in capsys.readouterr().err
    assert not csv.exists()


# -- help and usage -----------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ood {command}")
    usage = out.split("\n\n")[0]  # required options appear bare (not in brackets) in usage
    for option in REQUIRED[command]:
        assert re.search(rf"(?<!\[){re.escape(option)}\s", usage + " "), (option, usage)
        assert not re.search(rf"\[{re.escape(option)}[\s\]]", usage), (option, usage)


@pytest.mark.parametrize("command", [c for c in sorted(REQUIRED) if REQUIRED[c]])
def test_missing_required_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"ood {command}: error: the following arguments are required: " in err
    assert REQUIRED[command][0] in err


def test_no_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "ood", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ood ")
    for command in REQUIRED:
        assert command in result.stdout
    version = subprocess.run(
        [sys.executable, "-m", "ood", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and version.stdout.strip() == f"oodbench {__version__}"


@pytest.mark.parametrize("text", ["[1, 2]", '"k"', "3"])
def test_score_params_must_be_an_object(dumps, capsys, text):
    tmp_path, _, _ = dumps
    out = tmp_path / "x.parquet"
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["score", "--scorer", "knn", "--params", text]
            + ["--test", str(tmp_path / "test.parquet"), "--out", str(out)]
        )
    assert exit_info.value.code == 2
    assert "argument --params: expected a JSON object" in capsys.readouterr().err
    assert not out.exists()


def test_concat_tables_joins_and_reports_bad_input(tmp_path, capsys):
    header = ",".join(COLUMNS)
    row = ",".join("b1" if c == "benchmark" else "1" for c in COLUMNS)
    one = tmp_path / "b1.csv"
    one.write_text(f"{header}\n{row}\n")
    out = tmp_path / "all.csv"
    assert main(["concat-tables", str(one), "--out", str(out)]) == 0
    assert out.read_text() == f"{header}\n{row}\n"
    missing = tmp_path / "b2.csv"
    out.unlink()
    assert main(["concat-tables", str(one), str(missing), "--out", str(out)]) == 1
    assert f"ood concat-tables: error: {missing}: file not found" in capsys.readouterr().err
    assert not out.exists()
