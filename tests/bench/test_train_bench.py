"""The GPU training benchmark's smoke mode: every workload kind, strategy and floor field, on CPU, in seconds."""

from __future__ import annotations

import json

from bench.train_bench import STRATEGIES, main
from tests.helpers.encoders import SHARED_DATA


def test_train_bench_smoke_covers_every_strategy_and_the_floor(tmp_path):
    workloads = ["mind-title", "toeic"]
    real = (SHARED_DATA / "codeworkout_s19").is_dir()
    if real:
        workloads.append("kt-codeworkout")
    main(["--smoke", "--device", "cpu", "--workloads", *workloads, "--data-root", str(SHARED_DATA),
          "--time-budget-s", "120", "--out", str(tmp_path)])

    data = json.loads((tmp_path / "train_bench.json").read_text())
    assert (tmp_path / "train_bench.md").read_text().count("| target |") == 1
    assert data["skipped"] == [s for s in data["skipped"] if "partial" in s]  # nothing skipped for lack of time
    for name in workloads:
        record = data["workloads"][name]
        assert set(record["strategies"]) == set(STRATEGIES), name
        for label, result in record["strategies"].items():
            assert "error" not in result, (name, label, result)
            assert result["epoch_s"] > 0, (name, label)
            # Every strategy but NoContent runs the encoder forward, so its throughput is positive.
            assert (result["fwd_items_per_s"] > 0) == (label != "nocontent"), (name, label, result["fwd_items_per_s"])
        e2e, g1s = record["strategies"]["e2e"], record["strategies"]["gram-1s"]
        assert e2e["method"] == g1s["method"] == "steady" and g1s["R_step"] >= 1
        # GRAM-1S encodes each unique item of a step once, E2E every occurrence.
        assert e2e["encoder_items_forward"] == round(e2e["occurrences_per_step"] * e2e["steps_timed"])
        assert g1s["encoder_items_forward"] < e2e["encoder_items_forward"]
        assert record["strategies"]["nofinetune"]["encoder_items_backward"] == 0
        floor = record["floor"]
        for key in ("fwd_items_per_s", "fwdbwd_items_per_s", "cf_head_epoch_s", "floor_s", "gram_1e_over_floor"):
            assert floor[key] > 0, (name, key)
        epoch = record["epoch"]
        assert epoch["R"] == epoch["interactions"] / epoch["unique_items"] and record["info"]["scale"] > 0
    assert data["workloads"]["mind-title"]["epoch"]["occurrences"] == 55 * data["workloads"]["mind-title"]["epoch"]["interactions"]
    assert data["workloads"]["toeic"]["full_scale_projection"]["gram_1e_speedup"] > 0
    rows = {(t["target"], t["workload"]) for t in data["targets"]}
    assert ("GRAM-1E epoch within 1.5x of the floor", "toeic") in rows
    assert {t["status"] for t in data["targets"]} <= {"PASS", "FAIL", "n/a"}
    if real:
        runs = data["workloads"]["kt-codeworkout"]["train"]
        assert set(runs) == set(STRATEGIES)
        assert all(run["history"] and run["history"][0]["elapsed_s"] > 0 for run in runs.values())
        assert any(t["target"].startswith("GRAM-1E test auc") for t in data["targets"])


def test_train_bench_passes_the_memory_budget_through_and_reports_it(tmp_path):
    """--encoder-memory-gib reaches every strategy's settings: GRAM-1E's run carries the plan's caps (within the
    fixed cap), the table shows them next to the peak, and a budget too small for the fixed part is recorded as
    that strategy's error instead of stopping the benchmark."""
    common = ["--smoke", "--device", "cpu", "--workloads", "mind-title", "--strategies", "gram-1e", "nofinetune",
              "--time-budget-s", "60", "--encoder-batch-tokens", "4096"]
    main([*common, "--encoder-memory-gib", "mind-title=0.03", "--out", str(tmp_path / "fits")])
    data = json.loads((tmp_path / "fits" / "train_bench.json").read_text())
    assert data["meta"]["encoder_memory_gib"] == ["mind-title=0.03"]
    g1e = data["workloads"]["mind-title"]["strategies"]["gram-1e"]
    plan = g1e["memory_plan"]
    assert g1e["memory_budget_bytes"] == round(0.03 * 2**30) == plan["budget_bytes"]
    assert 0 < plan["backward_tokens"] < plan["forward_tokens"] <= 4096
    assert plan["fixed_bytes"] + plan["backward_tokens"] * plan["backward_bytes_per_token"] <= plan["budget_bytes"]
    assert data["workloads"]["mind-title"]["strategies"]["nofinetune"]["memory_plan"]["backward_tokens"] is None
    assert f"{plan['forward_tokens']:,} / {plan['backward_tokens']:,}" in (tmp_path / "fits" / "train_bench.md").read_text()

    main([*common, "--encoder-memory-gib", "0.001", "--out", str(tmp_path / "too-small")])
    data = json.loads((tmp_path / "too-small" / "train_bench.json").read_text())
    for label in ("gram-1e", "nofinetune"):
        assert data["workloads"]["mind-title"]["strategies"][label]["error"].startswith("memory budget: "), label
        assert "encoder_memory_gib" in data["workloads"]["mind-title"]["strategies"][label]["error"]
