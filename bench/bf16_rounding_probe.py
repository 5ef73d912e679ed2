"""How much a tiny optimizer step moves bf16-autocast encodings, against float32 ones (CPU, real MiniLM, real titles).

bench/regression_probe.py found on an H200 that after a regression pass at a small learning rate the trainer's
bf16 measurement of the pseudo-loss rose by the same amount whatever the rate (lr/64 .. lr/1024), while a float32
measurement of the same encoder saw it fall. This probe measures the mechanism on the CPU (torch.autocast("cpu",
bfloat16) rounds the Linear weights to bf16 as CUDA autocast does): from the encoder's weights, one sign-of-gradient
step of size `eps` on every trained parameter (Adam's first step has that shape), and the encodings' change under
bf16 autocast and in float32, relative to the bf16-vs-float32 difference at the start. The same is measured from a
start whose weights were first jittered off the fp16 grid: MiniLM is carried as fp16 and loaded as float32 master
weights, and an fp16 value sits exactly half-way between two bf16 values for 1 in 8 mantissas, where a step of any
size decides the rounding.

    python bench/bf16_rounding_probe.py --encoder-dir DIR [--news ../shared/data/mind_small_subset/news.tsv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gramrec.models.content_encoder import ContentEncoder, ItemTokens, load_tokenizer  # noqa: E402


def titles(news: Path, count: int) -> list[str]:
    with news.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row[3] for _, row in zip(range(count), rows)]


def encode(encoder: ContentEncoder, tokens: ItemTokens, bf16: bool) -> torch.Tensor:
    input_ids, mask = tokens.batch(torch.arange(len(tokens)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return encoder(input_ids, mask).float()


def linear_weights(encoder: ContentEncoder) -> list[torch.Tensor]:
    """The weights autocast casts to bf16 (Linear layers)."""
    return [m.weight for m in encoder.modules() if isinstance(m, nn.Linear)]


def tie_share(weights: list[torch.Tensor]) -> float:
    """Share of float32 values exactly half-way between two bf16 values (low 16 bits = 0x8000)."""
    low = torch.cat([(w.detach().view(torch.int32) & 0xFFFF).reshape(-1) for w in weights])
    return float((low == 0x8000).double().mean())


def sign_step(encoder: ContentEncoder, tokens: ItemTokens, eps: float, seed: int) -> dict[str, torch.Tensor]:
    """eps * sign(gradient) of the pseudo-loss towards slightly moved encodings (Adam's first step's shape)."""
    generator = torch.Generator().manual_seed(seed)
    start = encode(encoder, tokens, bf16=False)
    targets = start + 0.01 * start.norm(dim=1, keepdim=True) * torch.randn(start.shape, generator=generator) / 20
    encoder.zero_grad(set_to_none=True)
    input_ids, mask = tokens.batch(torch.arange(len(tokens)))
    (0.5 * (encoder(input_ids, mask) - targets).pow(2).sum()).backward()
    return {name: eps * p.grad.sign() for name, p in encoder.named_parameters() if p.grad is not None}


def measure(encoder: ContentEncoder, tokens: ItemTokens, step: dict[str, torch.Tensor]) -> dict:
    params = dict(encoder.named_parameters())
    bf16_before, fp32_before = encode(encoder, tokens, True), encode(encoder, tokens, False)
    cast_before = [w.detach().to(torch.bfloat16).float() for w in linear_weights(encoder)]
    ties = tie_share(linear_weights(encoder))
    saved = {name: params[name].detach().clone() for name in step}
    with torch.no_grad():
        for name, delta in step.items():
            params[name].add_(delta)
    bf16_after, fp32_after = encode(encoder, tokens, True), encode(encoder, tokens, False)
    cast_after = [w.detach().to(torch.bfloat16).float() for w in linear_weights(encoder)]
    with torch.no_grad():  # the exact start back (a subtraction would round)
        for name, value in saved.items():
            params[name].copy_(value)
    noise = float((bf16_before - fp32_before).norm())
    flat = torch.cat([w.detach().reshape(-1) for w in linear_weights(encoder)])
    cast_change = torch.cat([(a - b).reshape(-1) for a, b in zip(cast_after, cast_before)])
    return {
        "tie_share": ties,
        "fp32_weight_change": float(torch.cat([step[n].reshape(-1) for n in step]).norm())
        / float(torch.cat([p.detach().reshape(-1) for p in params.values()]).norm()),
        "bf16_cast_weight_change": float(cast_change.norm() / flat.norm()),
        "bf16_weights_moved": float((cast_change != 0).double().mean()),
        "bf16_encoding_change_over_bf16_noise": float((bf16_after - bf16_before).norm()) / noise,
        "fp32_encoding_change_over_bf16_noise": float((fp32_after - fp32_before).norm()) / noise,
        "bf16_noise_over_encodings": noise / float(fp32_before.norm()),
    }


def jitter_off_fp16(encoder: ContentEncoder, jitter: float, seed: int) -> None:
    """Multiplies every weight by (1 + jitter * noise). With jitter far above a step's relative size (and below
    bf16's relative spacing, 2^-8) no weight stays near a bf16 rounding tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1 + jitter * torch.randn(p.shape, generator=generator))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-dir", required=True)
    parser.add_argument("--news", default=str(REPO.parent / "shared" / "data" / "mind_small_subset" / "news.tsv"))
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-7, 1e-6, 1e-5])
    parser.add_argument("--jitter", type=float, default=1e-3, help="the second start's relative jitter")
    parser.add_argument("--starts", nargs="+", default=["as loaded", "jittered"], choices=["as loaded", "jittered"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    encoder = ContentEncoder.from_pretrained(args.encoder_dir).eval()
    tokens = ItemTokens.from_texts(load_tokenizer(args.encoder_dir), titles(Path(args.news), args.items), 64)
    results: dict = {"encoder_dir": args.encoder_dir, "items": args.items, "jitter": args.jitter, "torch": torch.__version__, "runs": []}
    for start in args.starts:
        if start == "jittered":
            jitter_off_fp16(encoder, args.jitter, args.seed)
        for eps in args.eps:
            step = sign_step(encoder, tokens, eps, args.seed)
            row = {"start": start, "eps": eps, **measure(encoder, tokens, step)}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    results["seconds"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
