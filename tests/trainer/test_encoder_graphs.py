"""The padded (graphable) encoder calls make the same updates as the reference calls.

On a CPU `encoder_step="graphed"` runs the very bodies the CUDA graphs capture, eagerly: padded row and width
buckets, padded rows weighted 0 (regression) or cut off before the loss (E2E, GRAM-1S), gradients summed into the
buffers .grad points at. These tests compare them with the eager reference in float64; on the GPU
bench/regression_graph_bench.py and bench/train_bench.py compare the replayed graphs with it (BENCHMARKS.md §3).
"""

from __future__ import annotations

import copy

import pytest
import torch

from gramrec.trainer.encoder_graphs import GraphedPseudoLoss, row_bucket
from gramrec.trainer.strategies import EndToEnd, GramMultiStep, GramSingleStep
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens, tiny_encoder
from tests.helpers.gram_runs import TASKS, kt_batches, make_run, max_relative_difference, parameters

# Several optimizer steps a pass, each of several micro-batches of unequal rows and widths.
SETTINGS = dict(period="100s", regress_lr=1e-3, regress_batch_size=5, encoder_batch_size=3, table_lr=1.0,
                regress_max_passes=2, progress=False)


def regressed(encoder_step: str):
    run = make_run(GramMultiStep, "kt", "adam", encoder_step=encoder_step, **SETTINGS)
    for batch in kt_batches(3):
        train_step(run, copy.deepcopy(batch))
    report = run.strategy.regress()
    return run, report


def test_graphed_regression_equals_the_eager_one():
    eager, eager_report = regressed("eager")
    graphed, graphed_report = regressed("graphed")
    assert graphed.strategy.regress_graphs is not None and eager.strategy.regress_graphs is None
    assert graphed.strategy.regress_graphs.shapes, "the padded call ran"
    assert eager_report.steps == graphed_report.steps > 2
    assert eager_report.fit != 0.0, "the regression moved the encoder (else there is nothing to compare)"
    assert graphed_report.fit == pytest.approx(eager_report.fit, rel=1e-9, abs=1e-12)
    after = {k: v.detach() for k, v in graphed.encoder.named_parameters()}
    reference = {k: v.detach() for k, v in eager.encoder.named_parameters()}
    # Padded calls sum in another order (float64 noise, 1e-16), which Adam's normalised steps raise: 1.4e-9 on
    # this CI machine's CPU, under 1e-9 on the one the test was written on. A lost or repeated row differs by >1e-3.
    assert max_relative_difference(after, reference) < 1e-7
    assert torch.allclose(graphed.strategy.encoded, eager.strategy.encoded, rtol=1e-9, atol=1e-12)
    assert graphed.encoder.items_backward == eager.encoder.items_backward


def test_padded_rows_add_nothing_and_earlier_gradients_are_kept():
    """Three texts run in an 8-row bucket; the gradient equals the unpadded loss's, added to what .grad held."""
    encoder = tiny_encoder().eval()
    tokens = random_tokens(6)
    rows = torch.argsort(tokens.lengths[:3], stable=True)
    targets = torch.randn(3, encoder.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = [p for p in encoder.parameters() if p.requires_grad]
    earlier = [torch.full_like(p, 0.5) for p in params]

    predicted = encoder.encode(tokens, rows, 8, autocast=False)
    expected = torch.autograd.grad(0.5 * (predicted - targets).pow(2).sum(), params)

    for param, grad in zip(params, earlier):
        param.grad = grad.clone()
    graphs = GraphedPseudoLoss(encoder)
    assert graphs.accepts(tokens, rows, token_cap=None) and row_bucket(3) == 8
    graphs.accumulate(tokens, rows, targets)
    ((shape_rows, _, _, _),) = graphs.shapes
    assert shape_rows == 8
    for param, before, wanted in zip(params, earlier, expected):
        assert param.grad is not None
        torch.testing.assert_close(param.grad, before + wanted, rtol=1e-10, atol=1e-12)


def test_row_buckets_pad_little_above_256_rows():
    assert [row_bucket(n) for n in (1, 8, 9, 200, 256, 257, 1000, 1025)] == [8, 8, 16, 256, 256, 384, 1024, 1152]


@pytest.mark.parametrize("strategy", [EndToEnd, GramSingleStep])
@pytest.mark.parametrize("task", ["kt", "nr"])
def test_graphed_train_encodes_equal_the_eager_ones(strategy, task):
    """E2E's and GRAM-1S's step with the padded call (forward now, backward when the CF loss reaches it): the same
    parameters after several steps as the eager encode (SGD: Adam would rescale the exactly-zero gradient of the
    attention key bias's rounding noise into full steps)."""
    eager = make_run(strategy, task, "sgd", encoder_step="eager", encoder_batch_size=64)
    graphed = make_run(strategy, task, "sgd", encoder_step="graphed", encoder_batch_size=64)
    assert graphed.strategy.train_graphs is not None and eager.strategy.train_graphs is None
    start = parameters(eager)
    for batch in TASKS[task][2](4):
        train_step(eager, copy.deepcopy(batch))
        train_step(graphed, copy.deepcopy(batch))
    shapes = graphed.strategy.train_graphs.shapes
    assert shapes and all(rows >= 8 for rows, _, _ in shapes), "every step ran the padded call"
    assert max_relative_difference(parameters(graphed), start) > 1e-4, "the steps moved the parameters"
    assert max_relative_difference(parameters(graphed), parameters(eager)) < 1e-9
    assert graphed.encoder.items_backward == eager.encoder.items_backward > 0


def test_a_batch_whose_padded_shape_exceeds_the_token_cap_stays_eager():
    encoder = tiny_encoder().eval()
    tokens = random_tokens(6)
    rows = torch.argsort(tokens.lengths[:3], stable=True)
    graphs = GraphedPseudoLoss(encoder)
    width = tokens.padded_width(int(tokens.lengths[rows[-1]]))
    assert graphs.accepts(tokens, rows, token_cap=8 * width)
    assert not graphs.accepts(tokens, rows, token_cap=8 * width - 1)


@pytest.mark.parametrize("cap", [700, 3723, 65536])
def test_regression_micro_batches_fit_the_graphs_they_run_in(cap):
    """With graphs, every micro-batch of padded texts fits the token cap as its graph lays it out (its row bucket
    times its padded width), so GraphedPseudoLoss.accepts takes it; texts long enough to be packed follow, cut as
    encode() cuts them. Without graphs, the encoder's own bounds. Either way the micro-batches cover the chunk."""
    from gramrec.models.content_encoder import PACK_MIN_TOKENS, batch_bounds
    from gramrec.trainer.regression import _micro_batches

    encoder = tiny_encoder()
    encoder.attention, encoder.batch_tokens = "auto", cap
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 2 * PACK_MIN_TOKENS, (900,), generator=g).sort().values
    cuda = torch.device("cuda")  # only its type is read: which texts encode() would pack there
    bounds = _micro_batches(encoder, lengths, 256, graphed=True, device=cuda)
    assert [lo for lo, _ in bounds[1:]] == [hi for _, hi in bounds[:-1]] and bounds[0][0] == 0
    assert bounds[-1][1] == len(lengths)
    for lo, hi in bounds:
        longest = int(lengths[hi - 1])
        if longest <= PACK_MIN_TOKENS:  # a padded call: it must fit its graph
            width = -(-longest // 8) * 8
            assert hi - lo == 1 or row_bucket(hi - lo) * width <= cap, (lo, hi)
        else:
            assert int(lengths[lo]) > PACK_MIN_TOKENS, "a micro-batch mixing padded and packed texts"
    assert _micro_batches(encoder, lengths, 256, graphed=False, device=cuda) == batch_bounds(lengths, 256, cap, True)
