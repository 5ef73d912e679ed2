"""Data loaders and splits: facts about the real shared data, and clear errors on malformed files."""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gramrec.trainer.errors import DataFormatError
from gramrec.trainer.items import ItemCatalog
from gramrec.trainer.kt_data import (
    KTDataset,
    load_codeworkout,
    load_kt_data,
    load_kt_tables,
    split_kt,
)
from gramrec.trainer.mind_data import Impression, MindDataset, load_mind, split_mind

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CODEWORKOUT = SHARED_DATA / "codeworkout_s19"
MIND = SHARED_DATA / "mind_small_subset"


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"shared data not available at {folder}")
    return folder


@pytest.fixture(scope="module")
def codeworkout() -> KTDataset:
    return load_codeworkout(_require(CODEWORKOUT))


@pytest.fixture(scope="module")
def mind() -> MindDataset:
    return load_mind(_require(MIND))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _expect_error(path: Path, line: int | None, match: str, load, *args) -> None:
    """Assert load(*args) raises a DataFormatError pointing at path:line whose message matches."""
    with pytest.raises(DataFormatError, match=match) as info:
        load(*args)
    err = info.value
    assert (Path(err.path), err.line) == (path, line)
    assert str(err).startswith(f"{path}:{line}: " if line is not None else f"{path}: ")


# ---------------------------------------------------------------------------------------------
# Errors and catalog


def test_data_format_error_message() -> None:
    assert str(DataFormatError("a.csv", 3, "bad")) == "a.csv:3: bad"
    err = DataFormatError("a.csv", None, "empty")
    assert str(err) == "a.csv: empty" and err.line is None and err.problem == "empty"
    assert isinstance(err, ValueError)


def test_item_catalog() -> None:
    catalog = ItemCatalog(["a", "b"], ["text a", "text b"])
    assert len(catalog) == 2 and catalog.index == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="duplicate"):
        ItemCatalog(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError):
        ItemCatalog(["a"], ["x", "y"])


# ---------------------------------------------------------------------------------------------
# CodeWorkout (real data)


def test_codeworkout_facts(codeworkout: KTDataset) -> None:
    assert len(codeworkout.items) == 50
    assert len(codeworkout.sequences) == 346
    assert sum(len(s) for s in codeworkout.sequences) == 14_828
    assert sum(int(s.correct.sum()) for s in codeworkout.sequences) == 5_853
    assert codeworkout.items.texts[codeworkout.items.index["1"]].startswith("Write a function in Java")
    for seq in codeworkout.sequences:
        assert seq.items.dtype == np.int64 and seq.correct.dtype == np.int64
        assert set(np.unique(seq.correct)) <= {0, 1}


def test_codeworkout_keeps_file_order_per_student(codeworkout: KTDataset) -> None:
    expected: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with open(CODEWORKOUT / "interactions_merged.csv", newline="") as f:
        for row in csv.DictReader(f):
            expected[row["SubjectID"]].append((row["ProblemID"], int(row["FirstAttemptCorrect"])))
    ids = codeworkout.items.ids
    for seq in codeworkout.sequences:
        assert [(ids[i], int(c)) for i, c in zip(seq.items, seq.correct)] == expected[seq.user_id]
    assert [s.user_id for s in codeworkout.sequences] == list(expected)  # first-appearance order


def test_load_kt_data_detects_codeworkout(codeworkout: KTDataset) -> None:
    dataset = load_kt_data(CODEWORKOUT)
    assert dataset.items.ids == codeworkout.items.ids
    assert [s.user_id for s in dataset.sequences] == [s.user_id for s in codeworkout.sequences]


def test_codeworkout_other_label_column() -> None:
    dataset = load_codeworkout(_require(CODEWORKOUT), label_column="CorrectEventually")  # True/False text
    assert sum(len(s) for s in dataset.sequences) == 14_828
    assert sum(int(s.correct.sum()) for s in dataset.sequences) > 5_853


def test_split_kt_real(codeworkout: KTDataset) -> None:
    splits = split_kt(codeworkout, seed=0)
    users = [{s.user_id for s in part} for part in (splits.train, splits.val, splits.test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    # 346 users: 69 test (20%), 28 val (10% of the remaining 277), 249 train
    assert (len(users[2]), len(users[1]), len(users[0])) == (69, 28, 249)
    assert users[0] | users[1] | users[2] == {s.user_id for s in codeworkout.sequences}

    assert len(splits.cold_items) == 5  # 10% of 50 items
    assert splits.cold_items.dtype == np.int64 and np.all(np.diff(splits.cold_items) > 0)
    cold = set(splits.cold_items.tolist())
    for seq in splits.train + splits.val:
        assert len(seq) > 0 and not cold & set(seq.items.tolist())
    in_test = set(np.concatenate([s.items for s in splits.test]).tolist())
    assert cold <= in_test

    # Test sequences keep every interaction, including those on cold items.
    original = {s.user_id: s for s in codeworkout.sequences}
    for seq in splits.test:
        assert np.array_equal(seq.items, original[seq.user_id].items)
        assert np.array_equal(seq.correct, original[seq.user_id].correct)


def test_split_kt_deterministic(codeworkout: KTDataset) -> None:
    def fingerprint(seed: int):
        s = split_kt(codeworkout, seed=seed)
        return (
            [q.user_id for q in s.train],
            [q.user_id for q in s.val],
            [q.user_id for q in s.test],
            s.cold_items.tolist(),
            [q.items.tolist() for q in s.train],
        )

    assert fingerprint(0) == fingerprint(0)
    assert fingerprint(0) != fingerprint(1)


def test_split_kt_without_cold_items(codeworkout: KTDataset) -> None:
    splits = split_kt(codeworkout, seed=3, cold_item_frac=0.0)
    assert len(splits.cold_items) == 0  # every item is answered by some train/val user
    assert sum(len(s) for s in splits.train + splits.val + splits.test) == 14_828
    with pytest.raises(ValueError):
        split_kt(codeworkout, test_frac=1.0)


# ---------------------------------------------------------------------------------------------
# Generic KT tables


def _generic_csv(tmp_path: Path, interactions: str, items: str = "item_id,text\na,first item\nb,second item\n"):
    return _write(tmp_path / "items.csv", items), _write(tmp_path / "interactions.csv", interactions)


def test_generic_csv_sorts_by_timestamp(tmp_path: Path) -> None:
    items, inter = _generic_csv(
        tmp_path,
        "user_id,item_id,correct,timestamp\n"
        "u1,a,1,2024-01-02T00:00:00\n"
        "u2,b,TRUE,5\n"
        "u1,b,false,2024-01-01T00:00:00\n"
        "u1,a,0,2024-01-02T00:00:00\n"  # tie with line 2: stays after it
        "u2,a,0,1\n",
    )
    dataset = load_kt_tables(items, inter)
    assert [s.user_id for s in dataset.sequences] == ["u1", "u2"]
    u1, u2 = dataset.sequences
    assert u1.items.tolist() == [1, 0, 0] and u1.correct.tolist() == [0, 1, 0]
    assert u2.items.tolist() == [0, 1] and u2.correct.tolist() == [0, 1]
    assert load_kt_data(tmp_path).items.ids == ["a", "b"]


def test_generic_csv_order_column_and_file_order(tmp_path: Path) -> None:
    items, inter = _generic_csv(tmp_path, "user_id,item_id,correct,order\nu,a,1,2\nu,b,0,1.5\n")
    assert load_kt_tables(items, inter).sequences[0].items.tolist() == [1, 0]
    _write(inter, "user_id,item_id,correct\nu,b,1\nu,a,0\n")
    assert load_kt_tables(items, inter).sequences[0].items.tolist() == [1, 0]


def test_generic_parquet_round_trip(tmp_path: Path) -> None:
    rows = [("u1", 20, True, 3), ("u2", 10, False, 1), ("u1", 10, False, 1), ("u2", 20, True, 2)]
    pq.write_table(pa.table({"item_id": [10, 20, 30], "text": ["ten", "twenty", "thirty"]}), tmp_path / "items.parquet")
    pq.write_table(
        pa.table({name: list(col) for name, col in zip(["user_id", "item_id", "correct", "order"], zip(*rows))}),
        tmp_path / "interactions.parquet",
    )
    from_parquet = load_kt_data(tmp_path)
    assert from_parquet.items.ids == ["10", "20", "30"] and from_parquet.items.texts[2] == "thirty"
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    _write(csv_dir / "items.csv", "item_id,text\n10,ten\n20,twenty\n30,thirty\n")
    lines = "".join(f"{u},{i},{c},{o}\n" for u, i, c, o in rows)
    _write(csv_dir / "interactions.csv", "user_id,item_id,correct,order\n" + lines)
    from_csv = load_kt_data(csv_dir)
    for a, b in zip(from_parquet.sequences, from_csv.sequences, strict=True):
        assert a.user_id == b.user_id
        assert a.items.tolist() == b.items.tolist() and a.correct.tolist() == b.correct.tolist()
    assert from_parquet.sequences[0].items.tolist() == [0, 1]  # u1: item 10 (order 1) then 20 (order 3)


def test_parquet_timestamps_and_bad_row(tmp_path: Path) -> None:
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b"], "text": ["x", "y"]}), items)
    inter = tmp_path / "interactions.parquet"
    times = [datetime(2024, 1, 2), datetime(2024, 1, 1)]
    table = {"user_id": ["u", "u"], "item_id": ["a", "b"], "correct": [1, 0], "timestamp": times}
    pq.write_table(pa.table(table), inter)
    assert load_kt_tables(items, inter).sequences[0].items.tolist() == [1, 0]
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "correct": [1, 7]}), inter)
    _expect_error(inter, 2, "bad correct", load_kt_tables, items, inter)
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"]}), inter)
    _expect_error(inter, None, "missing column.*correct", load_kt_tables, items, inter)


def test_kt_missing_column(tmp_path: Path) -> None:
    items, inter = _generic_csv(tmp_path, "user_id,item_id\nu,a\n")
    _expect_error(inter, 1, "missing column.*correct", load_kt_tables, items, inter)
    _write(items, "item_id,title\na,x\n")
    _expect_error(items, 1, "missing column.*text", load_kt_tables, items, inter)


def test_kt_bad_correct_value(tmp_path: Path) -> None:
    items, inter = _generic_csv(tmp_path, "user_id,item_id,correct\nu,a,1\nu,b,yes\n")
    _expect_error(inter, 3, "bad correct 'yes'", load_kt_tables, items, inter)


def test_kt_unknown_item(tmp_path: Path) -> None:
    items, inter = _generic_csv(tmp_path, "user_id,item_id,correct\nu,a,1\nu,b,0\nv,zzz,1\n")
    _expect_error(inter, 4, "unknown item_id 'zzz'", load_kt_tables, items, inter)


def test_kt_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    items, inter = _generic_csv(
        tmp_path, "user_id,item_id,correct\nu,a,1\n", items='item_id,text\na,"two\nlines"\nb,fine\na,dup\n'
    )
    _expect_error(items, 5, "duplicate item_id 'a'", load_kt_tables, items, inter)


def test_kt_other_errors(tmp_path: Path) -> None:
    items, inter = _generic_csv(tmp_path, "")
    _expect_error(inter, None, "empty file", load_kt_tables, items, inter)
    _write(inter, "user_id,item_id,correct\n")
    _expect_error(inter, None, "empty file", load_kt_tables, items, inter)
    _write(inter, "user_id,item_id,correct\n,a,1\n")
    _expect_error(inter, 2, "empty user_id", load_kt_tables, items, inter)
    _write(inter, "user_id,item_id,correct,timestamp\nu,a,1,2024-01-01\nu,a,1,yesterday\n")
    _expect_error(inter, 3, "bad timestamp", load_kt_tables, items, inter)
    _write(inter, "user_id,item_id,correct,order\nu,a,1,first\n")
    _expect_error(inter, 2, "bad order", load_kt_tables, items, inter)
    _write(items, "item_id,text\na,x\n,y\n")
    _expect_error(items, 3, "empty item_id", load_kt_tables, items, inter)


def test_load_kt_data_unknown_folder(tmp_path: Path) -> None:
    _expect_error(tmp_path, None, "problems.csv.*items", load_kt_data, tmp_path)


# ---------------------------------------------------------------------------------------------
# MIND (real data)


def test_mind_facts(mind: MindDataset) -> None:
    assert len(mind.items) == 51_282
    assert len(mind.impressions) == 5_000
    assert sum(int(i.labels.sum()) for i in mind.impressions) == 7_542
    assert sum(len(i.candidates) for i in mind.impressions) == 189_359
    assert len({i.user_id for i in mind.impressions}) == 4_637
    first = mind.impressions[0]
    assert (first.impression_id, first.user_id, first.time) == ("58376", "U81994", datetime(2019, 11, 12, 14, 14, 46))
    assert [mind.items.ids[i] for i in first.history[:3]] == ["N138", "N64727", "N138"]
    for imp in mind.impressions[:100]:
        assert imp.history.dtype == imp.candidates.dtype == imp.labels.dtype == np.int64
        assert len(imp.candidates) == len(imp.labels)
    assert mind.items.texts[mind.items.index["N19639"]] == "50 Worst Habits For Belly Fat"
    assert mind.items.metadata is not None and mind.items.metadata[mind.items.index["N19639"]] == {"category": "health"}
    assert sum(1 for m in mind.items.metadata if "category" in m) == len(mind.items)


def test_mind_load_is_fast() -> None:
    start = time.perf_counter()
    load_mind(_require(MIND))
    assert time.perf_counter() - start < 5.0


def test_mind_abstract_text() -> None:
    dataset = load_mind(_require(MIND), use_abstract=True)
    text = dataset.items.texts[dataset.items.index["N20922"]]
    assert text.startswith("The Price You Pay: The spiraling cost of college In our new series")
    assert dataset.items.texts[dataset.items.index["N19639"]] == "50 Worst Habits For Belly Fat"  # no abstract


def test_split_mind_real(mind: MindDataset) -> None:
    splits = split_mind(mind)
    assert {i.time.date() for i in splits.test} == {date(2019, 11, 14)}
    assert {i.time.date() for i in splits.val} == {date(2019, 11, 13)}
    assert max(i.time.date() for i in splits.train) == date(2019, 11, 12)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3_058, 974, 968)


def test_split_mind_needs_three_days() -> None:
    catalog = ItemCatalog(["N1"], ["t"])
    one = np.array([0], dtype=np.int64)
    imps = [Impression(str(d), "U", datetime(2019, 11, d), one, one, one) for d in (9, 10, 10)]
    with pytest.raises(ValueError, match="3 distinct days"):
        split_mind(MindDataset(catalog, imps))


# ---------------------------------------------------------------------------------------------
# MIND malformed files

NEWS = "N1\tnews\tsub\tA \"quoted\" title\tSome abstract\t\t\t\nN2\tsports\t\tSecond title\t\t\t\t\n"
GOOD_BEHAVIOR = "1\tU1\t11/12/2019 2:14:46 PM\tN1\tN1-0 N2-1\n"


def _mind(tmp_path: Path, behaviors: str, news: str = NEWS) -> tuple[Path, Path]:
    return _write(tmp_path / "news.tsv", news), _write(tmp_path / "behaviors.tsv", behaviors)


def test_mind_small_valid_files(tmp_path: Path) -> None:
    _mind(tmp_path, GOOD_BEHAVIOR + "2\tU2\t11/13/2019 12:05:00 AM\t\tN2-0\r\n")
    dataset = load_mind(tmp_path, use_abstract=True)
    assert dataset.items.texts == ['A "quoted" title Some abstract', "Second title"]
    second = dataset.impressions[1]
    assert second.history.tolist() == [] and second.candidates.tolist() == [1] and second.labels.tolist() == [0]
    assert second.time == datetime(2019, 11, 13, 0, 5, 0)
    assert dataset.impressions[0].labels.tolist() == [0, 1]


def test_mind_wrong_column_count(tmp_path: Path) -> None:
    _, behaviors = _mind(tmp_path, GOOD_BEHAVIOR + "2\tU1\t11/12/2019 2:14:46 PM\tN1-0\n")
    _expect_error(behaviors, 2, "expected 5 tab-separated columns, got 4", load_mind, tmp_path)
    news, _ = _mind(tmp_path, GOOD_BEHAVIOR, news=NEWS + "N3\tnews\tsub\n")
    _expect_error(news, 3, "at least 4", load_mind, tmp_path)


def test_mind_bad_impression_token(tmp_path: Path) -> None:
    _, behaviors = _mind(tmp_path, GOOD_BEHAVIOR * 2 + "3\tU1\t11/12/2019 2:14:46 PM\t\tN1-0 N2-2\n")
    _expect_error(behaviors, 3, "bad impression token 'N2-2'", load_mind, tmp_path)
    _mind(tmp_path, "3\tU1\t11/12/2019 2:14:46 PM\t\tN1\n")
    _expect_error(behaviors, 1, "bad impression token 'N1'", load_mind, tmp_path)


def test_mind_unknown_news_id(tmp_path: Path) -> None:
    _, behaviors = _mind(tmp_path, GOOD_BEHAVIOR + "2\tU1\t11/12/2019 2:14:46 PM\tN1 N99\tN1-1\n")
    _expect_error(behaviors, 2, "news id 'N99' not found", load_mind, tmp_path)
    _mind(tmp_path, GOOD_BEHAVIOR + "2\tU1\t11/12/2019 2:14:46 PM\t\tN1-1 N77-0\n")
    _expect_error(behaviors, 2, "news id 'N77' not found", load_mind, tmp_path)


def test_mind_other_errors(tmp_path: Path) -> None:
    _, behaviors = _mind(tmp_path, "1\tU1\t2019-11-12 14:14:46\t\tN1-1\n")
    _expect_error(behaviors, 1, "bad time", load_mind, tmp_path)
    news, _ = _mind(tmp_path, GOOD_BEHAVIOR, news=NEWS + "N1\tnews\t\tAgain\n")
    _expect_error(news, 3, "duplicate news id 'N1'", load_mind, tmp_path)
    _mind(tmp_path, GOOD_BEHAVIOR, news=NEWS + "N3\tnews\t\t  \n")
    _expect_error(news, 3, "empty title", load_mind, tmp_path)
