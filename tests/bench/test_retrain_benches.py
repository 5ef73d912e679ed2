"""The replay and freshness benchmarks on the embedded sqlite store (what the GPU host runs: no Redis there), on
tiny slices of the real MIND subset with the tiny encoder, and freshness' bookkeeping on its own."""

from __future__ import annotations

import json

import pytest

from bench import freshness_bench, replay_bench


def test_freshness_counts_an_impression_from_the_version_that_trained_on_it():
    """nr units are the logged impressions (`L<entry id>`): one held out in v1's gate slice is trained on by v2."""
    jobs = [
        {"status": "succeeded", "version": "nr-2", "base_version": "nr-1",
         "data": {"increment": {"after": "3", "through": "6"}, "last_logged_id": "6"}},
        {"status": "succeeded", "version": "nr-1", "base_version": "nr-0",
         "data": {"increment": {"after": None, "through": "3"}, "last_logged_id": "3"}},
        {"status": "rejected", "version": "nr-x", "data": {"last_logged_id": "9"}},
    ]
    gate_units = {"nr-1": {"L3"}, "nr-2": {"L6"}, "nr-x": set()}
    first_seen = {"nr-0": 0.0, "nr-1": 100.0, "nr-2": 200.0, "nr-x": 250.0}
    posted = [(str(i), f"L{i}", 10.0 * i) for i in range(1, 8)]

    delays, censored = freshness_bench.freshness(posted, jobs, gate_units, first_seen)

    # 1, 2: v1 (served at 100); 3: held out by v1, carried into v2 (200); 4, 5: v2; 6: held out by v2; 7: too late
    assert delays == [90.0, 80.0, 170.0, 160.0, 150.0]
    assert censored == 2


def test_unit_of_a_post_is_what_the_gate_holds_out():
    assert freshness_bench.unit_of({"task": "kt", "user_id": "s1"}, "17-0") == "s1"
    assert freshness_bench.unit_of({"task": "nr", "user_id": "u1"}, "42") == "L42"


@pytest.mark.usefixtures("shared_data")
def test_replay_nr_on_sqlite_keeps_the_stream_bounded(tmp_path, shared_data, tiny_encoder_dir):
    """Each retrain compacts first: full segments go to Parquet and, with retention 0, leave the store, so the
    stream holds less than one segment while the log's history grows; every posted impression is kept once."""
    rows = replay_bench.main([
        "--task", "nr", "--store", "sqlite", "--modes", "incremental", "--chunks", "2", "--per-day", "7",
        "--device", "cpu", "--encoder-dir", str(tiny_encoder_dir), "--mind", str(shared_data / "mind_small_subset"),
        "--segment-entries", "3", "--stream-retention-s", "0", "--replay-min", "0",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "replay.json"),
    ])

    retrains = [r for r in rows if r["chunk"] > 0]
    assert [r["chunk"] for r in retrains] == [1, 2]
    posted = 0
    for row in retrains:
        posted += row["chunk_size"]
        assert row["store"] == "sqlite" and row["redis_bytes_in"] is None
        assert row["stream_length"] < 3
        assert row["segments"] * 3 + row["stream_length"] == posted
        assert row["data"]["mode"] == "incremental"
    assert retrains[1]["segments"] > retrains[0]["segments"]
    assert json.loads((tmp_path / "replay.json").read_text())["rows"] == rows


@pytest.mark.usefixtures("shared_data")
def test_freshness_nr_on_sqlite_with_a_trainer_process(tmp_path, shared_data, tiny_encoder_dir):
    """The product's trainer (a child process on the same sqlite file) retrains on the volume trigger and the app
    in this process serves its version: some posted impressions are trained on and served, none counted twice."""
    result = freshness_bench.main([
        "--task", "nr", "--store", "sqlite", "--device", "cpu", "--encoder-dir", str(tiny_encoder_dir),
        "--mind", str(shared_data / "mind_small_subset"), "--base-days", "3", "--per-day", "6",
        "--rate", "20", "--duration-s", "1.5", "--volume-trigger", "10", "--drain-s", "600",
        "--until-retrains", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "fresh.json"),
    ])

    assert result["posted"] == 18  # 3 days of 6 after the 3 base days
    assert result["trained_and_served"] + result["censored"] == result["posted"]
    assert result["retrains"] >= 1 and result["trained_and_served"] >= 10
    assert result["p50_s"] > 0
    jobs = json.loads((tmp_path / "fresh.json").read_text())["jobs"]
    assert {job["trigger"] for job in jobs} == {"volume"}
