"""How much GPU memory the regression's CUDA graphs keep allocated, per captured shape (issue #11's memory budget).

bench/memory_phases.py found multi-step GRAM's regression on titles ending ~1.1 GiB above where it started, with
the allocations live at the peak made inside the graphs' forward and backward. This probe isolates that: one
`GraphedPseudoLoss` (trainer/encoder_graphs.py) on a real encoder, a few padded shapes of synthetic titles, each
called until replayed, with the allocated and reserved memory after every call, then what is still allocated and
where it was made (CUDA's allocator history, Python frames):

    python3 bench/graph_memory_probe.py --encoder-dir DIR [--variant shared|pool-per-shape|current-stream]

  shared          as training runs it: one private pool for every shape, warm-up calls on a side stream
  pool-per-shape  each capture in a pool of its own
  current-stream  warm-up calls on the current stream
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict

import torch
from memory_phases import allocated_at

from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.trainer import encoder_graphs
from gramrec.trainer.encoder_graphs import GraphedPseudoLoss, row_bucket

MIB = 2**20


def titles(widths: list[int], rows: int, vocab: int) -> tuple[ItemTokens, list[torch.Tensor]]:
    """`rows` synthetic texts per width (each batch's longest text exactly that wide): tokens and each batch's items."""
    longest = max(widths)
    generator = torch.Generator().manual_seed(0)
    ids, lengths, batches = [], [], []
    for width in widths:
        length = torch.randint(max(2, width - 7), width + 1, (rows,), generator=generator)
        length[-1] = width
        first = len(lengths) * rows
        ids.append(torch.randint(1000, vocab, (rows, longest), generator=generator))
        lengths.append(length)
        order = torch.argsort(length, stable=True)
        batches.append(first + order)
    return ItemTokens(input_ids=torch.cat(ids), lengths=torch.cat(lengths)), batches


def live_blocks() -> dict[str, list[int]]:
    """Allocated blocks grouped by the project frames that made them: bytes, count."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                entry = groups[allocated_at(block.get("frames", []))]
                entry[0] += block["size"]
                entry[1] += 1
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-dir", required=True)
    parser.add_argument("--variant", choices=["shared", "pool-per-shape", "current-stream"], default="shared")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 24, 32, 40])
    parser.add_argument("--rows", type=int, default=64, help="texts per call (padded to row_bucket)")
    parser.add_argument("--calls", type=int, default=4, help="calls per shape (2 warm-up, a capture, replays)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it measures CUDA graphs' memory")
    device = torch.device("cuda")
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=200_000)
    encoder = ContentEncoder.from_pretrained(args.encoder_dir).to(device).eval()
    tokens, batches = titles(args.widths, args.rows, encoder.backbone.config.vocab_size)
    if args.variant == "current-stream":
        encoder_graphs.on_side_stream = lambda device, body: body()
    graphs = GraphedPseudoLoss(encoder)
    if args.variant == "pool-per-shape":
        graphs.pool = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    print(f"variant {args.variant}, {args.rows} rows (bucket {row_bucket(args.rows)}), widths {args.widths}")
    print(f"start: allocated {start / MIB:.1f} MiB (weights and gradient buffers)")
    print(
        "| width | call | allocated above start (MiB) | reserved (MiB) | captures | replays |\n|---|---|---|---|---|---|"
    )
    for width, items in zip(args.widths, batches):
        targets = torch.randn(len(items), encoder.dim, device=device)
        for call in range(args.calls):
            graphs.accumulate(tokens, items, targets)
            torch.cuda.synchronize()
            above = (torch.cuda.memory_allocated() - start) / MIB
            print(
                f"| {width} | {call} | {above:.1f} | {torch.cuda.memory_reserved() / MIB:.1f} | "
                f"{graphs.captures} | {graphs.replays} |"
            )
    gc.collect()
    torch.cuda.synchronize()
    print(f"after gc: allocated above start {(torch.cuda.memory_allocated() - start) / MIB:.1f} MiB")
    print("\n| still allocated (MiB) | blocks | made at |\n|---|---|---|")
    for key, (size, count) in sorted(live_blocks().items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"| {size / MIB:.1f} | {count} | {key} |")
    del graphs
    gc.collect()
    torch.cuda.synchronize()
    print(f"graphs dropped: allocated above start {(torch.cuda.memory_allocated() - start) / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
