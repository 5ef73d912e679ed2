"""The memory budget (trainer/memory_budget.py): caps follow the budget, respect it by their own estimate, refuse
an impossible one by name, and change how items are batched, never what training computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gramrec.models.content_encoder import batch_bounds
from gramrec.trainer.memory_budget import GIB, MemoryBudgetError, plan_for_strategy
from gramrec.trainer.settings import TrainSettings
from gramrec.trainer.strategies import GramMultiStep
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens, tiny_encoder
from tests.helpers.gram_runs import kt_batches, make_run, max_relative_difference, parameters

CPU = torch.device("cpu")


def plan(budget_gib: float, max_tokens: int | None = None, regresses: bool = True):
    encoder = tiny_encoder()
    head = torch.nn.Linear(encoder.dim, 4).double()
    return plan_for_strategy(budget_gib, encoder, random_tokens(200), CPU, head, tables=2, regresses=regresses,
                             max_tokens=max_tokens)


def fixed_and_per_token() -> tuple[int, int]:
    reference = plan(1.0)
    return reference.fixed_bytes, reference.backward_bytes_per_token


def test_caps_shrink_with_the_budget_and_stay_within_it_by_the_estimate():
    fixed, per_token = fixed_and_per_token()
    budgets = [(fixed + tokens * per_token) / GIB for tokens in (40, 200, 1_000, 5_000, 25_000)]
    plans = [plan(b) for b in budgets]
    forward = [p.forward_tokens for p in plans]
    backward = [p.backward_tokens for p in plans]
    assert forward == sorted(forward) and backward == sorted(backward)
    assert backward[0] < backward[-1] / 100 and forward[0] < forward[-1] / 100
    for p in plans:
        assert p.backward_tokens < p.forward_tokens  # a kept graph costs more per token than a forward
        assert p.estimate(p.forward_tokens, backward=False) <= p.budget_bytes
        assert p.estimate(p.backward_tokens, backward=True) <= p.budget_bytes
        assert p.estimate(p.backward_tokens + 1, backward=True) > p.budget_bytes  # the largest cap that fits
    assert plan(budgets[-1], max_tokens=500).forward_tokens == 500  # never above the fixed cap


def test_padded_batches_are_counted_as_wide_as_they_are_laid_out():
    tokens = random_tokens(200, max_len=20)
    order = torch.argsort(tokens.lengths, stable=True)
    for cap in (16, 40, 100, 333):
        bounds = batch_bounds(tokens.lengths[order], 10_000, cap, packed=False)
        for lo, hi in bounds:
            input_ids, _ = tokens.batch(order[lo:hi])
            assert input_ids.numel() <= cap or hi - lo == 1, (cap, lo, hi, input_ids.shape)


def test_an_impossible_budget_fails_naming_the_setting():
    fixed, _ = fixed_and_per_token()
    with pytest.raises(MemoryBudgetError, match="encoder_memory_gib") as error:
        plan(0.5 * fixed / GIB)
    assert "fixed part" in str(error.value)
    with pytest.raises(MemoryBudgetError, match="encoder_memory_gib"):  # a strategy refuses it at construction
        make_run(GramMultiStep, "kt", "adam", period="2s", encoder_memory_gib=1e-6)
    with pytest.raises(ValueError):  # validated > 0
        TrainSettings(task="kt", data=Path("x"), encoder_memory_gib=0)


def test_a_small_budget_changes_batching_not_results():
    """Multi-step GRAM with regressions, float64: with a budget whose caps split every encode and regression
    micro-batch into calls of a few items, the losses, weights and table equal those of the unbudgeted run."""
    common = dict(period="2s", regress_max_passes=2, regress_batch_size=6)
    free = make_run(GramMultiStep, "kt", "adam", **common)
    sizing = plan_for_strategy(1.0, free.encoder, free.strategy.tokens, CPU, free.head, tables=2, regresses=True,
                               max_tokens=None)
    budget = (sizing.fixed_bytes + 20 * sizing.backward_bytes_per_token) / GIB
    capped = make_run(GramMultiStep, "kt", "adam", encoder_memory_gib=budget, **common)
    memory_plan = capped.strategy.memory_plan
    assert memory_plan is not None and memory_plan.backward_tokens == 20
    assert capped.encoder.backward_tokens == 20 and capped.encoder.forward_tokens > 20
    calls: dict[str, list[tuple[bool, int]]] = {"free": [], "capped": []}  # (graph kept, tokens laid out) per call
    for name, run in (("free", free), ("capped", capped)):
        forward = run.encoder.forward

        def counted(input_ids, *args, _forward=forward, _name=name, **kwargs):
            calls[_name].append((torch.is_grad_enabled(), input_ids.numel()))
            return _forward(input_ids, *args, **kwargs)

        run.encoder.forward = counted
    losses = {"free": [], "capped": []}
    for batch in kt_batches(6):
        for name, run in (("free", free), ("capped", capped)):
            losses[name].append(float(train_step(run, copy.deepcopy(batch))))
    assert len(free.strategy.reports) == 3 and all(r.steps for r in free.strategy.reports)
    # The caps did split the calls: every regression micro-batch within 20 tokens (16-wide items go alone), every
    # inference call within the forward cap, where the unbudgeted run's calls were larger.
    assert all(tokens <= 20 for grad, tokens in calls["capped"] if grad), calls["capped"]
    assert all(tokens <= capped.encoder.forward_tokens for grad, tokens in calls["capped"] if not grad)
    assert max(tokens for grad, tokens in calls["free"] if grad) > 20
    assert len(calls["capped"]) > len(calls["free"])
    assert losses["capped"] == pytest.approx(losses["free"], rel=1e-9)
    # Other batches sum the gradients in another order (float64 noise, 1e-16), which Adam's normalised steps over
    # three regressions raise to ~5e-9 here; a batching that lost or repeated an item would differ by far more.
    assert max_relative_difference(parameters(capped), parameters(free)) < 1e-7
    assert torch.allclose(capped.strategy.table, free.strategy.table, rtol=1e-7, atol=1e-10)


def test_the_regression_graphs_are_counted_when_they_fit_and_dropped_when_they_do_not():
    """On a GPU the graphs hold one more gradient set and keep their activations while forward calls run: both
    counted, and a budget only the eager regression fits runs the regression eagerly instead of failing."""
    encoder = tiny_encoder()
    head = torch.nn.Linear(encoder.dim, 4).double()
    tokens = random_tokens(200)
    gpu = torch.device("cuda")  # the plan only reads the device's type: no GPU needed

    def gpu_plan(budget_gib: float, graphs: bool):
        return plan_for_strategy(budget_gib, encoder, tokens, gpu, head, tables=2, regresses=True, max_tokens=None,
                                 regression_graphs=graphs)

    eager = gpu_plan(1.0, graphs=False)
    trained_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters() if p.requires_grad)
    roomy = (eager.fixed_bytes + trained_bytes + 20_000 * eager.backward_bytes_per_token) / GIB
    graphed = gpu_plan(roomy, graphs=True)
    assert graphed.regression_graphs and not gpu_plan(roomy, graphs=False).regression_graphs
    assert graphed.fixed["regression_graph_gradients"] == trained_bytes
    held = graphed.fixed_bytes + graphed.backward_tokens * graphed.backward_bytes_per_token
    assert held + graphed.forward_tokens * graphed.forward_bytes_per_token <= graphed.budget_bytes

    tight = (eager.fixed_bytes + trained_bytes // 2 + 40 * eager.backward_bytes_per_token) / GIB  # no room for a set
    fallback = gpu_plan(tight, graphs=True)
    assert not fallback.regression_graphs and "eagerly" in fallback.notes[0]
    assert fallback.backward_tokens == gpu_plan(tight, graphs=False).backward_tokens


def test_a_gpu_plan_counts_cublas_workspaces_and_a_cpu_plan_does_not():
    """cuBLAS keeps a workspace per stream for the whole process (65 MiB a stream measured on an H100): a GPU
    plan counts the three streams training runs matmuls on, and its caps shrink by what they take."""
    encoder = tiny_encoder()
    head = torch.nn.Linear(encoder.dim, 4).double()
    tokens = random_tokens(200)

    def plan(device: str, budget_gib: float):
        return plan_for_strategy(budget_gib, encoder, tokens, torch.device(device), head, tables=2, regresses=True,
                                 max_tokens=None)

    assert "cublas_workspaces" not in plan("cpu", 1.0).fixed
    gpu = plan("cuda", 1.0)
    workspaces = 3 * 65 * 2**20
    assert gpu.fixed["cublas_workspaces"] == workspaces
    # The workspaces come out of the budget before the caps: 195 MiB more budget buys exactly the caps that the
    # budget would give without them.
    roomier = plan("cuda", 1.0 + workspaces / GIB)
    without = gpu.budget_bytes - (gpu.fixed_bytes - workspaces)
    assert roomier.backward_tokens == without // gpu.backward_bytes_per_token > gpu.backward_tokens
