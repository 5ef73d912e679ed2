"""Where the encoder's fixed cost per call goes: one small forward+backward (train mode, as E2E / GRAM-1S run it).

    python bench/encoder_profile.py --encoder-dir DIR [--out DIR]        (about a minute on an H200)

Per call size and token length (synthetic ids, the workloads' mean lengths): wall time per synchronised
forward+backward, and the host's share of it (time until the call returns without synchronising: a call whose
host time is its wall time is launch- and Python-bound, not GPU-bound). Variants, each changing one thing:
eval mode (no dropout), no bf16 autocast, padded instead of packed layout, forward only. Then torch.profiler over
the default call: kernels launched, host time by operator (top 15), GPU busy time. JSON and the tables to --out.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.workloads import synthetic_tokens  # noqa: E402
from gramrec.models.content_encoder import ContentEncoder  # noqa: E402


def time_call(call, device, repeats: int) -> dict:
    """Median wall (synchronised) and host (unsynchronised) milliseconds of `call`."""
    for _ in range(3):
        call()
    torch.cuda.synchronize(device)
    walls, hosts = [], []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        call()
        hosts.append(time.perf_counter() - t0)
        torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
    return {"wall_ms": statistics.median(walls) * 1e3, "host_ms": statistics.median(hosts) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-dir", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--lengths", type=float, nargs="+", default=[11.5, 147.0], help="mean tokens per item")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results/encoder_profile")
    args = parser.parse_args()
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = ContentEncoder.from_pretrained(args.encoder_dir).to(device)
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": []}
    lines = ["| tokens | items | variant | wall ms | host ms | host share |", "|---|---|---|---|---|---|"]
    for mean in args.lengths:
        tokens = synthetic_tokens(max(args.sizes) * 2, mean, 30522, np.random.default_rng(0))
        for size in args.sizes:
            idx = torch.arange(size)

            def fwd_bwd(mode: str = "auto", autocast: bool = True) -> None:
                encoder.attention = mode
                encoder.encode(tokens, idx, size, autocast=autocast).sum().backward()
                encoder.zero_grad(set_to_none=True)

            def forward() -> None:
                with torch.no_grad():
                    encoder.encode(tokens, idx, size)

            variants = {
                "train fwd+bwd (default)": lambda: (encoder.train(), fwd_bwd()),
                "eval fwd+bwd (no dropout)": lambda: (encoder.eval(), fwd_bwd()),
                "train fwd+bwd, no autocast": lambda: (encoder.train(), fwd_bwd(autocast=False)),
                "train fwd+bwd, packed": lambda: (encoder.train(), fwd_bwd("packed")),
                "train fwd+bwd, padded": lambda: (encoder.train(), fwd_bwd("padded")),
                "eval forward only": lambda: (encoder.eval(), forward()),
            }
            for name, call in variants.items():
                r = time_call(call, device, args.repeats) | {"tokens": mean, "items": size, "variant": name}
                results["rows"].append(r)
                lines.append(f"| {mean:g} | {size} | {name} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} | "
                             f"{r['host_ms'] / r['wall_ms']:.0%} |")
                print(lines[-1], flush=True)
    (out / "encoder_profile.md").write_text("\n".join(lines) + "\n")
    (out / "encoder_profile.json").write_text(json.dumps(results, indent=2))
    # Profile the default call at 256 titles.
    tokens = synthetic_tokens(512, args.lengths[0], 30522, np.random.default_rng(0))
    idx = torch.arange(256)
    encoder.train()
    encoder.attention = "auto"
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        encoder.encode(tokens, idx, 256).sum().backward()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            encoder.encode(tokens, idx, 256).sum().backward()
            encoder.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / 5
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                 "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemsetAsync")]
    summary = {"kernels_per_call": len(kernels) / 5, "gpu_kernel_ms_per_call": gpu_ms,
               "runtime_calls_per_call": {n: sum(e.name == n for e in launches) / 5
                                          for n in sorted({e.name for e in launches})},
               "runtime_call_ms_per_call": {n: sum(e.cpu_time for e in launches if e.name == n) / 1e3 / 5
                                            for n in sorted({e.name for e in launches})}}
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    results["profile_256_titles"] = summary
    print(json.dumps(summary, indent=1))
    print(table)
    (out / "encoder_profile.json").write_text(json.dumps(results, indent=2))
    (out / "encoder_profile.md").write_text("\n".join(lines) + "\n\n" + json.dumps(summary, indent=1) + "\n\n" + table)


if __name__ == "__main__":
    main()
