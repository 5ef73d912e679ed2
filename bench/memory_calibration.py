"""The memory budget's per-token estimate (trainer/memory_budget.py) against measured activation memory.

    python bench/memory_calibration.py [--device cpu|cuda] [--encoder-dir DIR] [--widths 16 32] [--out DIR]

For each padded width W and precision (float32; bf16 autocast: CUDA's, or the CPU's own autocast on a CPU), a
MiniLM-shaped encoder (random weights unless --encoder-dir) encodes batches of items all W tokens long, at two
batch sizes; the slope between them is bytes per token, so weights, optimizer state and other fixed memory cancel.
Measured per token:
  saved     bytes of the distinct storages autograd saves for the backward (saved_tensors_hooks; any device)
  forward   peak of live bytes during a no-grad forward (CUDA: max_memory_allocated; CPU: the profiler's
            allocation events, summed in time order)
  backward  peak of live bytes during forward + backward (same two sources)
against the module's saved_bytes_per_token, forward_bytes_per_token, backward_bytes_per_token (estimate/measured
> 1: the estimate is conservative). CPU numbers are tensor bytes, not the process's memory; CUDA numbers include
the caching allocator's rounding. Writes memory_calibration.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import BertConfig, BertModel

from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.trainer.memory_budget import (
    EncoderShape,
    Precision,
    backward_bytes_per_token,
    forward_bytes_per_token,
    saved_bytes_per_token,
)


def make_encoder(args, device: torch.device) -> ContentEncoder:
    if args.encoder_dir:
        encoder = ContentEncoder.from_pretrained(args.encoder_dir, pooling=args.pooling)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, intermediate_size=args.intermediate,
                            max_position_embeddings=512)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        encoder = ContentEncoder(BertModel(config, add_pooling_layer=False), pooling=args.pooling)
    encoder.attention = "padded"
    return encoder.to(device).eval()  # eval: the regression's mode (no dropout masks)


def tokens_of_width(count: int, width: int) -> ItemTokens:
    g = torch.Generator().manual_seed(width)
    ids = torch.randint(1000, 30000, (count, width), generator=g)
    return ItemTokens(input_ids=ids, lengths=torch.full((count,), width))


def encode(encoder: ContentEncoder, tokens: ItemTokens, autocast: bool) -> torch.Tensor:
    """One padded call, as encode() makes it, under the device's own bf16 autocast when `autocast` (encode() itself
    enables autocast only on CUDA, and its disabled region would switch an outer CPU autocast off)."""
    device = next(encoder.parameters()).device
    input_ids, attention_mask = tokens.batch(torch.arange(len(tokens)))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return encoder(input_ids.to(device), attention_mask.to(device)).float()


def saved_bytes(encoder, tokens, autocast) -> int:
    params = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encode(encoder, tokens, autocast)
    del out
    return sum(seen.values())


def peak_bytes(encoder, tokens, autocast, backward: bool) -> int:
    device = next(encoder.parameters()).device

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = encode(encoder, tokens, autocast)
            if backward:
                out.float().sum().backward()
        encoder.zero_grad(set_to_none=True)

    if device.type == "cuda":
        run()  # warm: cuBLAS workspaces, kernels
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # Each op's own allocations net of its own frees (children excluded), and allocations or frees outside any op
    # ("[memory]"), in the order they started: the live tensor bytes over time (an op's internal transients are not
    # seen, its result is).
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def slope(measure, encoder, pair: list[ItemTokens], autocast: bool, *more) -> float:
    """Bytes per token: the measurement's growth from the smaller batch to the larger, over the tokens added."""
    small, large = pair
    extra = int(large.lengths.sum() - small.lengths.sum())
    return (measure(encoder, large, autocast, *more) - measure(encoder, small, autocast, *more)) / extra


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder-dir", default=None)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--pooling", choices=["mean", "attention"], default="attention")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--items", type=int, nargs=2, default=[32, 96], help="the two batch sizes of the slope")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "memory"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    encoder = make_encoder(args, device)
    shape = EncoderShape.of(encoder)
    rows = []
    for precision in args.precisions:
        autocast = precision == "bf16"
        p = Precision.of(shape, autocast)
        for width in args.widths:
            pair = [tokens_of_width(n, width) for n in args.items]
            row = {
                "precision": precision, "width": width, "device": str(device),
                "saved": slope(saved_bytes, encoder, pair, autocast),
                "forward": slope(peak_bytes, encoder, pair, autocast, False),
                "backward": slope(peak_bytes, encoder, pair, autocast, True),
                "saved_estimate": saved_bytes_per_token(shape, p, width, autocast),
                "forward_estimate": forward_bytes_per_token(shape, p, width),
                "backward_estimate": backward_bytes_per_token(shape, p, width, autocast),
            }
            rows.append(row)
            print(f"{precision:8s} W={width:3d}: " + ", ".join(
                f"{k} {row[k]:,.0f} B/token (estimate {row[k + '_estimate']:,} = {row[k + '_estimate'] / max(row[k], 1):.2f}x)"
                for k in ("saved", "forward", "backward")), flush=True)
    result = {"device": str(device), "torch": torch.__version__, "shape": shape.__dict__, "items": args.items,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_calibration.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
