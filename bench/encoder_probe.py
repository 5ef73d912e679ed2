"""Encoder-pass micro-benchmark: padded vs packed (padding-free) MiniLM on the GPU, with correctness checks.

    python bench/encoder_probe.py --encoder-dir DIR [--out DIR]    (about 3 minutes on an H100)

Checks (bf16 autocast, the training precision): packed vs padded embeddings and encoder gradients, as
||packed - padded|| / ||padded||, each against the float32 reference's own distance to the bf16 padded result
(bf16 noise); the attention kernel packed batches used; that aten's flash op (the dropout path) gives the
varlen kernel's gradients at dropout 0. Timing: items/s for forward-only (eval, no grad), forward+backward in
eval mode (the GRAM regression) and in train mode (dropout on: E2E / GRAM-1S), at the token lengths of the
paper's datasets (synthetic ids, lengths ~ Normal(mean, 0.35 mean)), per batch size. Median of timed repeats.
Prints a table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import gramrec.models.packed_attention as pa
from bench.workloads import synthetic_tokens
from gramrec.models.content_encoder import ContentEncoder

LENGTHS = {"mind-title": 11.5, "mind-real-title": 16.0, "toeic": 147.0, "poj": 271.0}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grads(encoder: ContentEncoder) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])


def check(encoder: ContentEncoder, tokens, device) -> dict:
    """Packed vs padded under bf16 autocast (eval: varlen kernel), and the float32 reference."""
    idx = torch.randperm(len(tokens))[:512]
    out = {}
    encoder.eval()
    results = {}
    for mode, autocast in (("padded", True), ("packed", True), ("padded_fp32", False), ("packed_fp32", False)):
        encoder.attention = mode.split("_")[0]
        encoder.zero_grad(set_to_none=True)
        emb = encoder.encode(tokens, idx, 256, autocast=autocast)
        emb.pow(2).sum().backward()
        results[mode] = (emb.detach(), grads(encoder))
    encoder.zero_grad(set_to_none=True)
    out["emb_packed_vs_padded_bf16"] = rel(results["packed"][0], results["padded"][0])
    out["grad_packed_vs_padded_bf16"] = rel(results["packed"][1], results["padded"][1])
    out["emb_padded_bf16_vs_fp32"] = rel(results["padded"][0], results["padded_fp32"][0])
    out["grad_padded_bf16_vs_fp32"] = rel(results["padded"][1], results["padded_fp32"][1])
    out["emb_packed_vs_padded_fp32"] = rel(results["packed_fp32"][0], results["padded_fp32"][0])
    out["grad_packed_vs_padded_fp32"] = rel(results["packed_fp32"][1], results["padded_fp32"][1])
    q = torch.randn(1, 12, 300, 32, device=device, dtype=torch.bfloat16)
    out["kernel_eval"] = pa.kernel_for(q, 0.0)
    out["kernel_train_dropout"] = pa.kernel_for(q, 0.1)
    # The dropout path's op at p = 0 against varlen_attn: same outputs and gradients.
    if pa._varlen_attn() is not None and pa._flash_op_available():
        lengths = torch.tensor([5, 17, 1, 40, 9])
        cu = torch.zeros(6, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu[1:])
        cu = cu.to(device)
        t = int(lengths.sum())
        qkv = [torch.randn(t, 12, 32, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        a = pa._varlen_attn()(*qkv, cu, cu, 40, 40)
        ga = torch.autograd.grad(a.float().pow(2).sum(), qkv)
        b = torch.ops.aten._flash_attention_forward(*qkv, cu, cu, 40, 40, 0.0, False, return_debug_mask=False)[0]
        gb = torch.autograd.grad(b.float().pow(2).sum(), qkv)
        out["flash_op_vs_varlen_out"] = rel(b, a)
        out["flash_op_vs_varlen_grad"] = max(rel(x, y) for x, y in zip(gb, ga))
        d = torch.ops.aten._flash_attention_forward(*qkv, cu, cu, 40, 40, 0.1, False, return_debug_mask=False)[0]
        gd = torch.autograd.grad(d.float().pow(2).sum(), qkv)
        out["flash_op_dropout_finite"] = bool(torch.isfinite(d).all() and all(torch.isfinite(g).all() for g in gd))
    # Train mode through the encoder (dropout on -> the flash op): runs and is finite.
    encoder.train()
    encoder.attention = "packed"
    emb = encoder.encode(tokens, idx, 256)
    emb.pow(2).sum().backward()
    out["train_mode_packed_finite"] = bool(torch.isfinite(grads(encoder)).all())
    encoder.zero_grad(set_to_none=True)
    return out


def timed(fn, device, min_s: float) -> float:
    """Median seconds of one fn() over repeats (after one warm-up call)."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_s or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(encoder: ContentEncoder, tokens, device, batch: int, mode: str, sample: int, min_s: float) -> dict:
    idx = torch.randperm(len(tokens))[:sample]
    encoder.attention = mode.split("+")[0]
    encoder.batch_tokens = 65536

    def forward():
        encoder.eval()
        with torch.no_grad():
            encoder.encode(tokens, idx, batch)

    def fwdbwd(train: bool):
        def run():
            encoder.train(train)
            for start in range(0, len(idx), batch):
                encoder.encode(tokens, idx[start : start + batch], batch).pow(2).sum().backward()
            encoder.zero_grad(set_to_none=True)
        return run

    out = {}
    if mode.endswith("+compile"):  # torch.compile of the backbone, dynamic shapes (T and B vary per batch)
        plain = encoder.backbone
        encoder.backbone = torch.compile(plain, dynamic=True)
        try:
            t0 = time.perf_counter()
            for fn in (forward, fwdbwd(False), fwdbwd(True)):
                fn()
            torch.cuda.synchronize(device)
            out["compile_s"] = time.perf_counter() - t0
            out.update(speed_of(forward, fwdbwd, idx, device, min_s))
        except Exception as error:  # noqa: BLE001 - report the failure, keep measuring the rest
            out["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print("compile failed:", out["error"], flush=True)
        finally:
            encoder.backbone = plain
        return out
    out.update(speed_of(forward, fwdbwd, idx, device, min_s))
    return out


def speed_of(forward, fwdbwd, idx, device, min_s: float) -> dict:
    out = {}
    for name, fn in (("fwd", forward), ("fwdbwd_eval", fwdbwd(False)), ("fwdbwd_train", fwdbwd(True))):
        try:
            out[name] = len(idx) / timed(fn, device, min_s)
        except torch.OutOfMemoryError:
            out[name] = None
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder-dir", required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--min-s", type=float, default=1.0)
    parser.add_argument("--workloads", nargs="+", default=["mind-title", "toeic"])
    parser.add_argument("--modes", nargs="+", default=["padded", "packed"], help="padded, packed, packed+compile")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 256 1024 4096 (short), 128 256 512 (long)")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    import transformers

    device = torch.device("cuda")
    torch.manual_seed(0)
    encoder = ContentEncoder.from_pretrained(args.encoder_dir, pooling="mean").to(device)
    meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "varlen_attn": pa._varlen_attn() is not None,
            "flash_op": pa._flash_op_available(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(meta, flush=True)
    rng = np.random.default_rng(0)
    results = {"meta": meta, "check": {}, "speed": {}}
    for name in args.workloads:
        tokens = synthetic_tokens(20_000, LENGTHS[name], encoder.backbone.config.vocab_size, rng)
        if not args.skip_check:
            results["check"][name] = check(encoder, tokens, device)
            print(name, "check", results["check"][name], flush=True)
        long = LENGTHS[name] > 64
        batches = args.batches or ((128, 256, 512) if long else (256, 1024, 4096))
        sample = 4096 if long else 16384
        for batch in batches:
            for mode in args.modes:
                r = speed(encoder, tokens, device, batch, mode, sample, args.min_s)
                results["speed"][f"{name}/{batch}/{mode}"] = r
                print(name, batch, mode, {k: (round(v) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        Path(args.out, "encoder_probe.json").write_text(json.dumps(results, indent=2))
    print("\n| workload | batch | layout | fwd items/s | fwd+bwd eval items/s | fwd+bwd train items/s |")
    print("|---|---|---|---|---|---|")
    for key, r in results["speed"].items():
        name, batch, mode = key.split("/")
        cells = " | ".join(f"{r[k]:,.0f}" if r.get(k) else r.get("error", "OOM")[:40] for k in ("fwd", "fwdbwd_eval", "fwdbwd_train"))
        print(f"| {name} | {batch} | {mode} | {cells} |" + (f" compile {r['compile_s']:.0f}s" if "compile_s" in r else ""))


if __name__ == "__main__":
    main()
