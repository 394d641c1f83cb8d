"""The checks `make test-slurm` runs after the cluster run (tests/slurm/), on
hand-written inputs: the table comparison and the per-job GPU check. The
cluster run itself is `make test-slurm` (root, real daemons), not pytest."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from check_jobs import parse, problems  # noqa: E402
from compare_tables import differences  # noqa: E402
from compare_tables import main as compare_main  # noqa: E402

from ood.tables import COLUMNS, concat_tables  # noqa: E402


def job_line(job_id: int, comment: str, gpu: bool, state: str = "COMPLETED") -> str:
    """A `scontrol show job -o` line as Slurm 22.05 writes it (abridged)."""
    tres = " TresPerJob=gres:gpu:1" if gpu else ""
    return (
        f"JobId={job_id} JobName=e41cc019 UserId=root(0) JobState={state} Reason=None "
        f"NumCPUs=2 CPUs/Task=2 TRES=cpu=2,mem=8000M,node=1,billing=2 MinMemoryNode=8000M "
        f"Comment={comment} {tres} StdErr=/x/{job_id}.log Power= "
    )


def test_parse_reads_key_values_per_job():
    text = job_line(1, "rule_train_wildcards_demo_ce_0", True) + "\n" + job_line(2, "rule_x", 0)
    jobs = parse(text)
    assert [j["JobId"] for j in jobs] == ["1", "2"]
    assert jobs[0]["Comment"] == "rule_train_wildcards_demo_ce_0"
    assert jobs[0]["TresPerJob"] == "gres:gpu:1" and "TresPerJob" not in jobs[1]
    assert jobs[0]["MinMemoryNode"] == "8000M"


def test_gpu_on_model_jobs_only_passes():
    lines = [
        job_line(1, "rule_train_wildcards_demo_ce_0", True),
        job_line(2, "rule_features_wildcards_demo_ce_0_test_noise", True),
        job_line(3, "rule_score_wildcards_demo_ce_0_odin_noise", True),
        job_line(4, "rule_score_wildcards_demo_ce_0_ada_gradnorm_noise", True),
        job_line(5, "rule_score_wildcards_demo_ce_0_energy_noise", False),
        job_line(6, "rule_score_wildcards_demo_ce_0_knn-k10_noise", False),
        job_line(7, "rule_curate_dataset_wildcards_noise", False),
        job_line(8, "rule_tables", False),
    ]
    assert problems(parse("\n".join(lines))) == []


@pytest.mark.parametrize(
    ("comment", "gpu", "message"),
    [
        ("rule_train_wildcards_demo_ce_0", False, "expected a GPU"),
        ("rule_score_wildcards_demo_ce_0_mahalanobis_ens_noise", False, "expected a GPU"),
        ("rule_score_wildcards_demo_ce_0_msp_noise", True, "expected no GPU"),
        ("rule_audit_wildcards_demo_noise", True, "expected no GPU"),
        ("", False, "no rule in comment"),
    ],
)
def test_wrong_gpu_request_is_reported(comment, gpu, message):
    (found,) = problems(parse(job_line(9, comment, gpu)))
    assert found.startswith("job 9") and message in found


def test_failed_job_is_reported():
    (found,) = problems(parse(job_line(4, "rule_tables", False, state="FAILED")))
    assert "state FAILED" in found


def table(rows: list[dict]) -> pd.DataFrame:
    base = {c: "x" for c in COLUMNS}
    return pd.DataFrame([{**base, **row} for row in rows], columns=COLUMNS, dtype=str)


def test_differences_match_rows_by_key_in_any_order():
    a = table([{"variant": "msp", "auroc": "0.9"}, {"variant": "knn", "auroc": "0.8"}])
    assert differences(a, a.iloc[::-1].reset_index(drop=True)) == []


def test_differences_name_the_cell_and_the_missing_rows():
    a = table([{"variant": "msp", "auroc": "0.900000"}, {"variant": "knn", "auroc": "0.8"}])
    b = table([{"variant": "msp", "auroc": "0.900001"}, {"variant": "vim", "auroc": "0.8"}])
    found = differences(a, b)
    assert "('x', 'x', 'x', 'msp', 'x') auroc: '0.900000' != '0.900001'" in found
    assert "row ('x', 'x', 'x', 'knn', 'x') only in expected" in found
    assert "row ('x', 'x', 'x', 'vim', 'x') only in actual" in found
    assert len(found) == 3


def test_compare_exit_codes(tmp_path, capsys):
    a = table([{"variant": "msp", "auroc": "0.9"}])
    b = table([{"variant": "msp", "auroc": "0.8"}])
    for name, frame in (("a.csv", a), ("b.csv", b)):
        frame.to_csv(tmp_path / name, index=False)
    assert compare_main([str(tmp_path / "a.csv"), str(tmp_path / "a.csv")]) == 0
    assert compare_main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 1
    assert "1 differences between" in capsys.readouterr().err


# -- concat_tables (the `tables` rule: all.csv from per-benchmark tables) ----------------


def test_concat_keeps_cells_and_orders_by_benchmark(tmp_path):
    b2 = table([{"benchmark": "b2", "seed": "10", "auroc": "0.500000"}])
    b1 = table(
        [
            {"benchmark": "b1", "seed": "2", "auroc": "0.100000"},
            {"benchmark": "b1", "seed": "10", "auroc": "0.123400"},
        ]
    )
    paths = []
    for name, frame in (("b2.csv", b2), ("b1.csv", b1)):
        frame.to_csv(tmp_path / name, index=False)
        paths.append(tmp_path / name)
    out = tmp_path / "all.csv"
    concat_tables(paths, out)
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    # b1's rows first, in their own order (seed 2 before 10), cells as written.
    assert [line.split(",")[0] for line in lines[1:]] == ["b1", "b1", "b2"]
    assert [line.split(",")[COLUMNS.index("auroc")] for line in lines[1:]] == [
        "0.100000",
        "0.123400",
        "0.500000",
    ]


def test_concat_rejects_foreign_columns_and_repeated_rows(tmp_path):
    good = tmp_path / "good.csv"
    table([{"benchmark": "b1"}]).to_csv(good, index=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("benchmark,auroc\nb1,0.5\n")
    out = tmp_path / "all.csv"
    with pytest.raises(ValueError, match=r"bad\.csv: columns .* are not those of all\.csv"):
        concat_tables([good, bad], out)
    with pytest.raises(ValueError, match="the same row is in two tables: benchmark=b1"):
        concat_tables([good, good], out)
    assert not out.exists()
