"""The Parquet contracts of DESIGN.md: feature dumps, score dumps, atomic writes."""

import hashlib
import json
import os
import re
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ood.io import (
    DumpError,
    FeatureSet,
    ScoreSet,
    read_features,
    read_scores,
    sha256_file,
    write_features,
    write_scores,
    write_text_atomic,
)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def features():
    rng = np.random.default_rng(11)
    return FeatureSet(
        # Not 0..N-1 and beyond int32: the index is carried, not regenerated.
        index=np.array([10, 3, 7, 2**40], dtype=np.int64),
        label=np.array([0, 2, -1, 1], dtype=np.int64),
        logits=rng.normal(size=(4, 3)),  # float64 in: stored as float32
        feature=rng.normal(size=(4, 5)).astype(np.float32),
        extra={
            "views": rng.normal(size=(4, 6)).astype(np.float32),
            "crop": rng.normal(size=(4, 2)).astype(np.float32),
        },
        metadata={"checkpoint_sha256": "abc123", "seed": "0", "note": 'ünïcode, "quoted"'},
    )


# -- feature dumps --------------------------------------------------------------


def test_feature_round_trip(tmp_path, features):
    path = tmp_path / "sub" / "dump.parquet"  # parent directory is created
    write_features(path, features)
    back = read_features(path, extra=("views", "crop"))

    assert back.index.dtype == np.int64 and back.label.dtype == np.int64
    np.testing.assert_array_equal(back.index, [10, 3, 7, 2**40])
    np.testing.assert_array_equal(back.label, [0, 2, -1, 1])
    assert back.logits.dtype == np.float32 and back.logits.shape == (4, 3)
    assert back.feature.dtype == np.float32 and back.feature.shape == (4, 5)
    np.testing.assert_array_equal(back.logits, features.logits.astype(np.float32))
    np.testing.assert_array_equal(back.feature, features.feature)
    assert set(back.extra) == {"views", "crop"}
    for name, values in features.extra.items():
        assert back.extra[name].dtype == np.float32
        np.testing.assert_array_equal(back.extra[name], values)
    assert back.metadata == features.metadata
    assert len(back) == 4


def test_feature_physical_schema(tmp_path, features):
    path = tmp_path / "dump.parquet"
    write_features(path, features)
    schema = pq.read_schema(path)
    assert schema.names == ["index", "label", "logits", "feature", "views", "crop"]
    assert schema.field("index").type == pa.int64()
    assert schema.field("label").type == pa.int64()
    for name, width in [("logits", 3), ("feature", 5), ("views", 6), ("crop", 2)]:
        kind = schema.field(name).type
        assert pa.types.is_fixed_size_list(kind), (name, kind)
        assert kind.list_size == width
        assert kind.value_type == pa.float32()
    # Provenance sits in the file metadata as one JSON object under b"oodbench".
    assert json.loads(schema.metadata[b"oodbench"]) == features.metadata


def test_read_only_logits_leaves_empty_feature(tmp_path, features):
    path = tmp_path / "dump.parquet"
    write_features(path, features)
    back = read_features(path, columns=("logits",))
    assert back.feature.shape == (4, 0) and back.feature.dtype == np.float32
    np.testing.assert_array_equal(back.logits, features.logits.astype(np.float32))
    assert back.extra == {}  # no extra column unless asked for

    back = read_features(path, columns=("feature",))
    assert back.logits.shape == (4, 0)
    np.testing.assert_array_equal(back.feature, features.feature)


def test_read_extra_star_and_subset(tmp_path, features):
    path = tmp_path / "dump.parquet"
    write_features(path, features)
    every = read_features(path, extra=("*",))
    assert sorted(every.extra) == ["crop", "views"]
    for name, values in features.extra.items():
        np.testing.assert_array_equal(every.extra[name], values)
    one = read_features(path, extra=("crop",))
    assert list(one.extra) == ["crop"]


def test_read_extra_star_without_extras(tmp_path, features):
    features.extra = {}
    path = tmp_path / "dump.parquet"
    write_features(path, features)
    assert read_features(path, extra=("*",)).extra == {}


# -- feature dump errors ----------------------------------------------------------


def test_read_missing_file(tmp_path):
    path = tmp_path / "absent.parquet"
    with pytest.raises(DumpError, match=re.escape(f"{path}: file not found")):
        read_features(path)
    with pytest.raises(DumpError, match=re.escape(f"{path}: file not found")):
        read_scores(path)


def test_read_parquet_lacking_feature(tmp_path):
    path = tmp_path / "nofeature.parquet"
    logits = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 3)
    pq.write_table(pa.table({"index": [0, 1], "label": [0, 1], "logits": logits}), path)
    with pytest.raises(DumpError, match=re.escape(f"{path}: missing column(s) feature")):
        read_features(path)
    # Even when only logits are wanted: the file does not follow the contract.
    with pytest.raises(DumpError, match=r"missing column\(s\) feature"):
        read_features(path, columns=("logits",))


def test_read_missing_extra_column(tmp_path, features):
    path = tmp_path / "dump.parquet"
    write_features(path, features)
    with pytest.raises(DumpError, match=r"missing column\(s\) nope$"):
        read_features(path, extra=("nope",))


def test_read_non_fixed_size_list_column(tmp_path):
    path = tmp_path / "varlist.parquet"
    ragged = pa.array([[1.0, 2.0], [3.0]], type=pa.list_(pa.float32()))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4, np.float32)), 2)
    table = pa.table({"index": [0, 1], "label": [0, 0], "logits": ragged, "feature": fixed})
    pq.write_table(table, path)
    with pytest.raises(DumpError, match="column 'logits' must be a fixed-size list"):
        read_features(path)


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all, just text\n"])
def test_read_non_parquet(tmp_path, content):
    path = tmp_path / "junk.parquet"
    path.write_bytes(content)
    with pytest.raises(DumpError, match=re.escape(f"{path}: not a readable Parquet file (")):
        read_features(path)
    with pytest.raises(DumpError, match="not a readable Parquet file"):
        read_scores(path)


def test_featureset_row_mismatch():
    with pytest.raises(DumpError, match="column 'label' has 2 rows, index has 3"):
        FeatureSet(
            index=np.arange(3),
            label=np.zeros(2, np.int64),
            logits=np.zeros((3, 2)),
            feature=np.zeros((3, 2)),
        )
    with pytest.raises(DumpError, match="column 'views' has 4 rows, index has 3"):
        FeatureSet(
            index=np.arange(3),
            label=np.zeros(3, np.int64),
            logits=np.zeros((3, 2)),
            feature=np.zeros((3, 2)),
            extra={"views": np.zeros((4, 2))},
        )


def test_write_rejects_1d_logits(tmp_path):
    data = FeatureSet(
        index=np.arange(3),
        label=np.zeros(3, np.int64),
        logits=np.zeros(3),
        feature=np.zeros((3, 2)),
    )
    path = tmp_path / "dump.parquet"
    with pytest.raises(
        DumpError, match=re.escape("column 'logits' must be 2-D (rows x width), got shape (3,)")
    ):
        write_features(path, data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["logits", "feature", "index", "label"])
def test_write_rejects_clashing_extra(tmp_path, features, name):
    features.extra = {name: np.zeros((4, 2), np.float32)}
    with pytest.raises(DumpError, match=f"extra column '{name}' clashes with a contract column"):
        write_features(tmp_path / "dump.parquet", features)
    assert list(tmp_path.iterdir()) == []


# -- atomic writes ----------------------------------------------------------------


def test_write_leaves_only_final_file(tmp_path, features):
    write_features(tmp_path / "f.parquet", features)
    write_scores(
        tmp_path / "s.parquet",
        ScoreSet(index=np.arange(2), label=np.zeros(2, np.int64), score=np.ones(2)),
    )
    write_text_atomic(tmp_path / "t.md", "hello\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet", "s.parquet", "t.md"]
    assert (tmp_path / "t.md").read_text() == "hello\n"


def test_written_files_are_not_private(tmp_path, features):
    expected = 0o666 & ~current_umask()
    write_features(tmp_path / "f.parquet", features)
    write_scores(
        tmp_path / "s.parquet",
        ScoreSet(index=np.arange(2), label=np.zeros(2, np.int64), score=np.ones(2)),
    )
    write_text_atomic(tmp_path / "t.md", "x")
    for name in ("f.parquet", "s.parquet", "t.md"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == expected, (name, oct(mode), oct(expected))


def fail_writes(monkeypatch, kind):
    """Make pq.write_table write some bytes to its target, then raise `kind`."""
    targets = []

    def write_then_fail(table, where, *args, **kwargs):
        targets.append(where)
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise kind("disk full")

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    return targets


@pytest.mark.parametrize("kind", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, features, monkeypatch, kind):
    final = tmp_path / "dump.parquet"
    targets = fail_writes(monkeypatch, kind)
    with pytest.raises(kind, match="disk full"):
        write_features(final, features)
    # The writer did get a temporary path beside the final one, and it is gone.
    assert len(targets) == 1
    assert os.path.dirname(targets[0]) == str(tmp_path)
    assert os.path.basename(targets[0]) != final.name
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_older_file(tmp_path, monkeypatch):
    final = tmp_path / "scores.parquet"
    old = ScoreSet(index=np.arange(3), label=np.zeros(3, np.int64), score=np.array([1.0, 2, 3]))
    write_scores(final, old)
    before = final.read_bytes()

    fail_writes(monkeypatch, RuntimeError)
    new = ScoreSet(index=np.arange(2), label=np.zeros(2, np.int64), score=np.array([9.0, 9]))
    with pytest.raises(RuntimeError, match="disk full"):
        write_scores(final, new)
    assert final.read_bytes() == before
    assert list(tmp_path.iterdir()) == [final]
    np.testing.assert_array_equal(read_scores(final).score, [1.0, 2.0, 3.0])


# -- score dumps ------------------------------------------------------------------


def test_scores_round_trip_exact_float64(tmp_path):
    values = np.array(
        [0.1, 1 / 3, np.nextafter(1.0, 2.0), 1e-300, -1.7976931348623157e308, -0.0, 5e-324]
    )
    scores = ScoreSet(
        index=np.array([5, 4, 3, 2, 1, 0, 2**40]),
        label=np.array([0, 1, -1, -1, 2, 0, -1]),
        score=values,
        metadata={"scorer": "msp", "params": "{}"},
    )
    path = tmp_path / "s.parquet"
    write_scores(path, scores)
    back = read_scores(path)
    assert back.score.dtype == np.float64
    # Bit-exact, not merely close.
    assert back.score.tobytes() == values.tobytes()
    assert back.index.dtype == np.int64 and back.label.dtype == np.int64
    np.testing.assert_array_equal(back.index, scores.index)
    np.testing.assert_array_equal(back.label, scores.label)
    assert back.metadata == {"scorer": "msp", "params": "{}"}
    schema = pq.read_schema(path)
    assert schema.names == ["index", "label", "score"]
    assert [schema.field(n).type for n in schema.names] == [pa.int64(), pa.int64(), pa.float64()]


def test_scores_float32_input_stored_as_float64(tmp_path):
    path = tmp_path / "s.parquet"
    value = np.float32(0.1)
    write_scores(path, ScoreSet(index=[0], label=[0], score=np.array([value])))
    assert read_scores(path).score[0] == np.float64(value)  # widened, not re-rounded


def test_write_scores_rejects_non_finite(tmp_path):
    path = tmp_path / "s.parquet"
    scores = ScoreSet(
        index=np.arange(5),
        label=np.zeros(5, np.int64),
        score=np.array([1.0, np.nan, np.inf, -np.inf, 2.0]),
    )
    with pytest.raises(DumpError, match=re.escape(f"{path}: 3 score(s) are NaN or infinite")):
        write_scores(path, scores)
    assert list(tmp_path.iterdir()) == []


def test_write_scores_rejects_length_mismatch(tmp_path):
    path = tmp_path / "s.parquet"
    short = ScoreSet(index=np.arange(3), label=np.zeros(3, np.int64), score=np.ones(2))
    with pytest.raises(
        DumpError, match=re.escape("score must be 1-D with one value per row, got (2,)")
    ):
        write_scores(path, short)
    flat = ScoreSet(index=np.arange(3), label=np.zeros(3, np.int64), score=np.ones((3, 1)))
    with pytest.raises(DumpError, match=re.escape("got (3, 1)")):
        write_scores(path, flat)
    bad_label = ScoreSet(index=np.arange(3), label=np.zeros(2, np.int64), score=np.ones(3))
    with pytest.raises(DumpError, match=re.escape(f"{path}: label has 2 rows, index has 3")):
        write_scores(path, bad_label)
    assert list(tmp_path.iterdir()) == []


def test_read_scores_missing_column(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"index": [0], "label": [0]}), path)
    with pytest.raises(DumpError, match=re.escape(f"{path}: missing column(s) score")):
        read_scores(path)


# -- sha256 -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_sha256_file_matches_hashlib(tmp_path, chunk):
    data = np.random.default_rng(3).bytes(1000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=chunk) == hashlib.sha256(data).hexdigest()


def test_sha256_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    # The well-known digest of zero bytes.
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
