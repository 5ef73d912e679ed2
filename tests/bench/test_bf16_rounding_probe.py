"""The bf16 rounding probe's measurements, on the tiny encoder: ties counted right, a tiny step seen in bf16."""

from __future__ import annotations

import torch

from bench.bf16_rounding_probe import jitter_off_fp16, linear_weights, measure, sign_step, tie_share
from tests.helpers.encoders import random_tokens, tiny_encoder


def test_fp16_values_sit_on_bf16_ties_one_in_eight_and_jitter_removes_them():
    fp16_values = torch.randn(20_000, generator=torch.Generator().manual_seed(0)).half().float()
    assert abs(tie_share([fp16_values]) - 0.125) < 0.01
    encoder = tiny_encoder(dtype=torch.float32)
    with torch.no_grad():
        for w in linear_weights(encoder):
            w.copy_(w.half().float())
    assert tie_share(linear_weights(encoder)) > 0.1
    jitter_off_fp16(encoder, 1e-3, seed=0)
    assert tie_share(linear_weights(encoder)) < 0.01


def test_from_fp16_weights_a_tiny_step_moves_bf16_encodings_far_more_than_float32_ones():
    """As MiniLM is carried: fp16 values in float32 master weights, an eighth of them on a bf16 tie."""
    torch.set_num_threads(1)
    encoder = tiny_encoder(dtype=torch.float32).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(p.half().float())
    tokens = random_tokens(32)
    step = sign_step(encoder, tokens, eps=1e-8, seed=0)
    before = [p.detach().clone() for p in encoder.parameters()]
    row = measure(encoder, tokens, step)
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # measure() undoes the step
    assert 0 < row["fp32_weight_change"] < 1e-5
    assert row["tie_share"] > 0.1 and row["bf16_weights_moved"] > 0.03  # the step decided the ties' rounding
    assert row["bf16_encoding_change_over_bf16_noise"] > 10 * row["fp32_encoding_change_over_bf16_noise"]
