"""The fast encoder paths compute the same function as the plain padded encoder.

* packed (padding-free) batches: same embeddings and gradients as padded ones (on the CPU the packed
  attention pads internally: this pins the packing, the position ids, the kwargs plumbing through the
  Hugging Face model and the pooling; the GPU kernels are checked by bench/encoder_probe.py);
* token-capped batches: same result, smaller batches;
* frozen-bottom cache: the same embeddings and top-layer gradients as the uncached model with the same
  bottom frozen, and the same training updates through the strategies.
"""

from __future__ import annotations

import pytest
import torch

from gramrec.models.content_encoder import PACK_MIN_TOKENS, batch_bounds, token_rows
from gramrec.models.packed_attention import kernel_for, packed_attention_forward
from gramrec.trainer.strategies import EndToEnd, GramMultiStep
from gramrec.trainer.train import train_step
from tests.helpers.encoders import random_tokens, tiny_encoder
from tests.helpers.gram_runs import (
    TASKS,
    make_run,
    max_relative_difference,
    parameters,
)

IDX = torch.tensor([3, 5, 3, 0, 39, 12, 7, 7, 20, 1, 2])  # repeats, mixed lengths


def encode_with_grads(encoder, tokens, attention: str, batch_size: int = 4):
    encoder.attention = attention
    encoder.zero_grad(set_to_none=True)
    embeddings = encoder.encode(tokens, IDX, batch_size)
    (embeddings.pow(2).sum() + embeddings.sum()).backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return embeddings.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grads_close(a: dict, b: dict, tol: float) -> None:
    """Every gradient within tol of the reference, relative to its own norm or, for gradients that are ~0 in
    exact arithmetic (attention key biases: softmax ignores them), to a millionth of the largest one."""
    assert a.keys() == b.keys()
    floor = 1e-6 * max(float(g.norm()) for g in b.values())
    for name in b:
        assert float((a[name] - b[name]).norm()) / max(float(b[name].norm()), floor) < tol, name


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_packed_equals_padded_float32(pooling):
    encoder, tokens = tiny_encoder(pooling, dtype=torch.float32), random_tokens(40)
    padded, padded_grads = encode_with_grads(encoder, tokens, "padded")
    packed, packed_grads = encode_with_grads(encoder, tokens, "packed")
    assert relative(packed, padded) < 1e-5
    grads_close(packed_grads, padded_grads, 1e-5)


def test_packed_equals_padded_float64_train_mode():
    encoder, tokens = tiny_encoder("attention"), random_tokens(40, seed=3)  # dropout 0: train mode is deterministic
    encoder.train()
    padded, padded_grads = encode_with_grads(encoder, tokens, "padded", batch_size=64)
    packed, packed_grads = encode_with_grads(encoder, tokens, "packed", batch_size=3)
    assert relative(packed, padded) < 1e-12
    grads_close(packed_grads, padded_grads, 1e-10)


def test_auto_is_padded_on_cpu_and_cpu_kernel_is_the_padded_fallback():
    encoder = tiny_encoder()
    assert not encoder.uses_packed(torch.device("cpu"), autocast=True)
    assert encoder.uses_packed(torch.device("cuda"), autocast=True)
    assert encoder.uses_packed(torch.device("cuda"), autocast=True, max_length=PACK_MIN_TOKENS + 1)
    assert not encoder.uses_packed(torch.device("cuda"), autocast=True, max_length=PACK_MIN_TOKENS)  # short: padded
    encoder.attention = "packed"
    assert encoder.uses_packed(torch.device("cuda"), autocast=True, max_length=4)
    encoder.attention = "auto"
    assert not encoder.uses_packed(torch.device("cuda"), autocast=False)  # float32 export stays padded
    assert kernel_for(torch.zeros(1, 2, 5, 8), 0.0) == "padded"
    with pytest.raises(ValueError, match="cu_seq_lens"):
        packed_attention_forward(None, *(torch.zeros(1, 2, 5, 8),) * 3, None)


def test_item_tokens_packed_layout():
    tokens = random_tokens(10, seed=1)
    idx = torch.tensor([4, 0, 4])
    batch = tokens.packed(idx)
    lengths = tokens.lengths[idx]
    assert batch.cu_seq_lens.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
    assert batch.cu_seq_lens.dtype == torch.int32 and batch.max_length == int(lengths.max())
    for b, item in enumerate(idx.tolist()):
        lo, hi = int(batch.cu_seq_lens[b]), int(batch.cu_seq_lens[b + 1])
        assert batch.input_ids[0, lo:hi].tolist() == tokens.input_ids[item, : tokens.lengths[item]].tolist()
        assert batch.position_ids[0, lo:hi].tolist() == list(range(hi - lo))
        assert (batch.token_batch[lo:hi] == b).all()


def test_batch_bounds_cap_items_and_tokens():
    lengths = torch.tensor([1, 2, 2, 3, 5, 8, 9])
    assert batch_bounds(lengths, 3, None, True) == [(0, 3), (3, 6), (6, 7)]
    assert batch_bounds(lengths, 4, 6, True) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]  # sums <= 6; 8, 9 alone
    # Padded: B x the width ItemTokens.batch builds, the longest length rounded up to 8 (9 -> 16).
    assert batch_bounds(lengths, 4, 6, False) == [(i, i + 1) for i in range(7)]  # 8 wide > 6: one item each
    assert batch_bounds(lengths, 10, 16, False) == [(0, 2), (2, 4), (4, 6), (6, 7)]  # 2 x 8; 9 is 16 wide
    assert batch_bounds(lengths, 10, 13, True) == [(0, 5), (5, 6), (6, 7)]  # 1+2+2+3+5 = 13


def test_token_cap_does_not_change_embeddings():
    encoder, tokens = tiny_encoder(), random_tokens(40)
    reference = encoder.encode(tokens, IDX, 64)
    encoder.batch_tokens = 10
    for attention in ("padded", "packed"):
        encoder.attention = attention
        assert torch.allclose(encoder.encode(tokens, IDX, 64), reference, atol=1e-12)


def test_no_grad_encode_writes_each_chunk_in_place_with_the_same_result():
    """A no-grad encode fills one [K, D] output chunk by chunk; with autograd it concatenates and reorders. Same rows,
    in idx's order, repeats included, in the weights' dtype."""
    encoder, tokens = tiny_encoder(), random_tokens(40)
    idx = torch.tensor([7, 3, 3, 39, 0, 12, 7, 25, 1, 30, 3])  # unsorted, with repeats
    encoder.batch_tokens = 12  # several chunks
    with_grad = encoder.encode(tokens, idx, 4).detach()
    with torch.no_grad():
        in_place = encoder.encode(tokens, idx, 4)
    assert in_place.dtype == torch.float64 and in_place.shape == (len(idx), encoder.dim)
    assert torch.equal(in_place, with_grad)
    assert torch.equal(in_place[1], in_place[2]) and torch.equal(in_place[0], in_place[6])
    with torch.no_grad():
        assert encoder.encode(tokens, torch.tensor([], dtype=torch.long), 4).shape == (0, encoder.dim)


def test_token_rows():
    offsets, lengths = torch.tensor([0, 2, 5, 6]), torch.tensor([2, 3, 1])
    assert token_rows(offsets, lengths, torch.tensor([1, 0, 2, 1])).tolist() == [2, 3, 4, 0, 1, 5, 2, 3, 4]


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_frozen_bottom_cache_matches_uncached(pooling):
    tokens = random_tokens(40, seed=2)
    cached, uncached = tiny_encoder(pooling), tiny_encoder(pooling)
    for encoder in (cached, uncached):
        encoder.freeze_bottom(1)
        encoder.train()
    cached.cache_bottom(tokens, batch_size=7)
    for name, layer in (("embeddings", cached.backbone.embeddings), ("layer 0", cached.backbone.encoder.layer[0])):
        assert not layer.training, f"frozen {name} must stay in eval mode"
    a, a_grads = encode_with_grads(cached, tokens, "packed")
    b, b_grads = encode_with_grads(uncached, tokens, "padded")
    assert relative(a, b) < 1e-12
    assert not any(name.startswith(("backbone.embeddings", "backbone.encoder.layer.0.")) for name in a_grads)
    grads_close(a_grads, b_grads, 1e-10)
    other = random_tokens(40, seed=5)  # other texts: not in the cache, full model
    assert torch.allclose(cached.encode(other, IDX, 4), uncached.encode(other, IDX, 4), atol=1e-12)


def test_freeze_rejects_too_many_layers():
    with pytest.raises(ValueError, match="freeze_bottom_layers"):
        tiny_encoder().freeze_bottom(3)


@pytest.mark.parametrize("strategy_cls,period", [(EndToEnd, "1s"), (GramMultiStep, "2s")])
def test_strategy_with_frozen_bottom_trains_like_uncached(strategy_cls, period):
    """freeze_bottom_layers=1 (cached) makes the same updates as an encoder frozen by hand with no cache, and
    never moves the frozen weights."""
    runs = {}
    for name, freeze in (("cached", 1), ("reference", 0)):
        run = make_run(strategy_cls, "kt", "adam", period=period, freeze_bottom_layers=freeze)
        if freeze == 0:
            run.encoder.freeze_bottom(1)
            run.strategy = strategy_cls(run.encoder, run.strategy.tokens, run.head, run.strategy.settings, 10)
        runs[name] = run
    assert runs["cached"].encoder.bottom_cache is not None and runs["reference"].encoder.bottom_cache is None
    before = parameters(runs["cached"])
    for batch in TASKS["kt"][2](4):
        for run in runs.values():
            train_step(run, batch)
    after = parameters(runs["cached"])
    reference = parameters(runs["reference"])
    # An attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys): Adam rescales
    # the two layouts' rounding noise there into steps, so it only has to agree to a millionth of the largest weight (its relative difference measured 2e-9 to 5e-9).
    noise = [k for k in after if k.endswith("attention.self.key.bias")]
    exact = [k for k in after if k not in noise]
    assert max_relative_difference({k: after[k] for k in exact}, {k: reference[k] for k in exact}) < 1e-9
    scale = max(float(v.abs().max()) for v in reference.values())
    assert noise and max(float((after[k] - reference[k]).abs().max()) for k in noise) < 1e-6 * scale
    frozen = [k for k in before if k.startswith(("encoder.backbone.embeddings", "encoder.backbone.encoder.layer.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder.backbone.encoder.layer.1."))
