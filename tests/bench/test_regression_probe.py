"""The regression probe's smoke mode: a real GRAM-1E situation on tiny data, every variant, on CPU."""

from __future__ import annotations

import json

import torch

from bench.regression_probe import main, variants


def test_regression_probe_smoke_runs_every_variant_from_the_same_start(tmp_path):
    torch.set_num_threads(1)
    results = main(["--smoke", "--device", "cpu", "--time-budget-s", "300", "--out", str(tmp_path)])

    saved = json.loads((tmp_path / "regression_probe.json").read_text())
    record = saved["workloads"]["mind-title"]
    assert record["info"]["rows"] > 0 and record["info"]["cf_steps"] == 3
    assert record["targets"]["move_over_norm_median"] > 0  # the CF steps moved the touched rows
    assert set(record["variants"]) == {v.name for v in variants(1e-3)} and not record["skipped"]
    floor = record["noise_floor"]["against"]
    # On the CPU (float32 throughout) the same batching repeats exactly and float32 is the reference itself.
    assert floor["repeat, same batching"]["encoding_diff_over_wanted"] == 0
    assert floor["float32 (no autocast)"]["encoding_diff_over_wanted"] == 0
    losses_before = {r["fp32"]["loss_before"] for r in record["variants"].values()}
    assert len(losses_before) == 1  # every variant starts from the same encoder and targets
    for name, r in record["variants"].items():
        assert r["steps"] > 0 and r["param_change"] > 0, name  # each pass really moved the encoder
        assert r["step_param_change"] > 0, name
    assert "| variant |" in (tmp_path / "regression_probe.md").read_text()
    assert results["workloads"]["mind-title"]["info"] == record["info"]
