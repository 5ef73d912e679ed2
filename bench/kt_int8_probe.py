"""Would int8 dynamic quantization of kt_state.onnx (the kt head's LSTM) make kt /predict faster on CPU, and how
much does it move the predicted probabilities?

    .venv/bin/python bench/kt_int8_probe.py                 # ~1-2 min on the 2-core box
    .venv/bin/python bench/kt_int8_probe.py --calls 300 --rounds 10 --length 100

What it does, in one process:
  1. Builds a kt head at the product's default sizes (item_dim 384 = all-MiniLM-L6-v2, hidden 128, 2 LSTM layers)
     and trains only the head for a few epochs on CodeWorkout S19 (--data), student-disjoint 80/20 split, with item
     vectors from the pretrained, frozen all-MiniLM-L6-v2 (mean pooling, 128 tokens, as kt's default). The product
     also fine-tunes the encoder; that does not change the LSTM's shapes, which is what the timing depends on.
  2. Exports kt_state.onnx with the trainer's own KnowledgeTracingState / _onnx_export (opset 17, as the product).
  3. quantize_dynamic variants: every supported op with QInt8 and with QUInt8 weights, and the LSTM only (QInt8);
     prints each graph's op types (does the LSTM become com.microsoft DynamicQuantizeLSTM?).
  4. Times kt_state per call (B = 1, one --length-answer history, the service's `_session` options: ORT_ENABLE_ALL,
     sequential, 1 inter-op thread) with intra-op threads 1 (the service default) and 2, variants interleaved
     round by round; median and p90 wall ms per call and mean process CPU ms per call.
  5. Probabilities through the split output layer (kt_output's formula; calibration left out, it is monotone):
     on the held-out students, every next answer after each prefix of their history (B = 1 per prefix, as served):
     max / mean |p_int8 - p_fp32| and AUC; and on --histories random length---length histories scored against the
     whole catalog.
  6. kt_step.onnx (the per-student cache's one-answer step) quantized the same ways: its time per answer, and the
     cache's invariant (kt_state over a prefix then kt_step over the last 5 answers == kt_state over the whole
     history; the export requires 1e-4) per variant.

Results on the 2-core box (ORT 1.32, 3 runs): BENCHMARKS.md §2, "int8 kt LSTM" (not adopted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from gramrec.models.content_encoder import ContentEncoder, ItemTokens, default_encoder_dir, load_tokenizer
from gramrec.models.knowledge_tracing_head import KnowledgeTracingHead
from gramrec.service.bundle import _session
from gramrec.trainer.export import KnowledgeTracingState, KnowledgeTracingStep, _onnx_export
from gramrec.trainer.kt_data import load_codeworkout

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--length", type=int, default=100, help="history length of the timed call (serve_bench's)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--histories", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


# -- model -----------------------------------------------------------------------------------------------
@torch.no_grad()
def item_vectors(texts: list[str]) -> np.ndarray:
    directory = default_encoder_dir()
    tokens = ItemTokens.from_texts(load_tokenizer(directory), texts, 128)
    encoder = ContentEncoder.from_pretrained(directory, pooling="mean").eval()
    ids = tokens.input_ids
    mask = (torch.arange(ids.shape[1])[None] < tokens.lengths[:, None]).long()
    return torch.cat([encoder(ids[i : i + 16], mask[i : i + 16]) for i in range(0, len(ids), 16)]).numpy()


def windows(sequences, width: int = 100):
    for s in sequences:
        for start in range(0, len(s), width):
            yield s.items[start : start + width], s.correct[start : start + width]


def train_head(vectors: np.ndarray, train, epochs: int, seed: int = 0) -> KnowledgeTracingHead:
    torch.manual_seed(seed)
    head = KnowledgeTracingHead(vectors.shape[1])  # product defaults: hidden 128, 2 layers, dropout 0.1
    table = torch.from_numpy(vectors)
    rows = list(windows(train))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        head.train()
        order = rng.permutation(len(rows))
        total = 0.0
        for b in range(0, len(order), 32):
            batch = [rows[i] for i in order[b : b + 32]]
            length = max(len(items) for items, _ in batch)
            items = torch.zeros(len(batch), length, dtype=torch.long)
            correct = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.bool)
            for r, (i, c) in enumerate(batch):
                items[r, : len(i)], correct[r, : len(c)], mask[r, : len(i)] = (
                    torch.from_numpy(i),
                    torch.from_numpy(c),
                    True,
                )
            logits = head(table[items], correct)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], correct[mask].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
        print(f"  epoch {epoch + 1}: train loss {total / len(rows):.4f}", file=sys.stderr)
    return head.eval()


def export_state(head: KnowledgeTracingHead, path: Path) -> None:
    dim = head.item_projection.in_features
    g = torch.Generator().manual_seed(1)
    sample = (
        torch.randn(2, 7, dim, generator=g),
        torch.randint(0, 2, (2, 7), generator=g),
        torch.ones(2, 7, dtype=torch.bool),
    )
    axes = {n: {0: "B", 1: "T"} for n in ("history", "history_correct", "history_mask")}
    axes |= {"state": {0: "B"}, "h": {1: "B"}, "c": {1: "B"}}
    _onnx_export(KnowledgeTracingState(head), sample, path, list(axes)[:3], ["state", "h", "c"], axes)


def export_step(head: KnowledgeTracingHead, path: Path) -> None:
    dim, layers, hidden = head.item_projection.in_features, head.lstm.num_layers, head.hidden_dim
    g = torch.Generator().manual_seed(1)
    memory = torch.zeros(layers, 2, hidden)
    sample = (memory, memory, torch.randn(2, 3, dim, generator=g), torch.randint(0, 2, (2, 3), generator=g))
    axes = {"h": {1: "B"}, "c": {1: "B"}, "history": {0: "B", 1: "T"}, "history_correct": {0: "B", 1: "T"}}
    axes |= {"state": {0: "B"}, "next_h": {1: "B"}, "next_c": {1: "B"}}
    _onnx_export(KnowledgeTracingStep(head), sample, path, list(axes)[:4], ["state", "next_h", "next_c"], axes)


def output_parts(head: KnowledgeTracingHead) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.detach().float().numpy() for k, v in head.output_parts().items()}


def probabilities(parts: dict[str, np.ndarray], state: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """kt_output's scoring: state [H], targets [K, D] -> P(correct) [K] (uncalibrated sigmoid)."""
    hidden = parts["state_weight"] @ state + targets @ parts["item_weight"].T + parts["item_bias"]
    logits = np.maximum(hidden, 0) @ parts["out_weight"] + parts["out_bias"][0]
    return 1 / (1 + np.exp(-logits))


# -- quantization ------------------------------------------------------------------------------------------
def op_types(path: Path) -> dict[str, int]:
    model = onnx.load(str(path))
    return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node))


def optimized_op_types(path: Path, threads: int) -> dict[str, int]:
    """Op types after ORT's own graph optimizations (what actually runs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    options.intra_op_num_threads = threads
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return op_types(path.with_suffix(".opt.onnx"))


def quantized_variants(fp32: Path) -> dict[str, Path]:
    variants = {"fp32": fp32}
    for name, kwargs in {
        "int8 all QInt8": {"weight_type": QuantType.QInt8},
        "int8 all QUInt8": {"weight_type": QuantType.QUInt8},
        "int8 LSTM-only QInt8": {"weight_type": QuantType.QInt8, "op_types_to_quantize": ["LSTM"]},
    }.items():
        out = fp32.with_name(name.replace(" ", "_") + ".onnx")
        quantize_dynamic(str(fp32), str(out), **kwargs)
        variants[name] = out
    return variants


# -- timing ------------------------------------------------------------------------------------------------
def time_sessions(sessions: dict[str, ort.InferenceSession], feed: dict, calls: int, rounds: int) -> dict:
    walls: dict[str, list[float]] = {n: [] for n in sessions}
    cpu: dict[str, float] = {n: 0.0 for n in sessions}
    for s in sessions.values():
        for _ in range(20):
            s.run(None, feed)
    for r in range(rounds):
        names = list(sessions) if r % 2 == 0 else list(reversed(sessions))  # alternate order against drift
        for name in names:
            s = sessions[name]
            c0 = time.process_time()
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                s.run(None, feed)
                walls[name].append((time.perf_counter_ns() - t0) / 1e6)
            cpu[name] += time.process_time() - c0
    return {
        n: {
            "median_ms": statistics.median(w),
            "p90_ms": float(np.percentile(w, 90)),
            "cpu_ms": 1e3 * cpu[n] / len(w),
            "calls": len(w),
        }
        for n, w in walls.items()
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores[np.diff(np.sort(scores), prepend=np.nan) == 0]):  # average ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    positive = labels == 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def state_of(session: ort.InferenceSession, vectors: np.ndarray, items: np.ndarray, correct: np.ndarray) -> np.ndarray:
    feed = {
        "history": vectors[items][None].astype(np.float32),
        "history_correct": correct[None].astype(np.int64),
        "history_mask": np.ones((1, len(items)), np.bool_),
    }
    return session.run(["state"], feed)[0][0]


def main() -> None:
    args = parse_args()
    results: dict = {"onnxruntime": ort.__version__, "torch": torch.__version__}
    dataset = load_codeworkout(args.data)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset.sequences))
    cut = int(0.8 * len(order))
    train = [dataset.sequences[i] for i in order[:cut]]
    test = [dataset.sequences[i] for i in order[cut:]]
    print(f"{len(dataset.items)} items, {len(train)} train / {len(test)} held-out students", file=sys.stderr)
    vectors = item_vectors(dataset.items.texts)
    head = train_head(vectors, train, args.epochs)
    parts = output_parts(head)

    work = Path(tempfile.mkdtemp(prefix="kt-int8-"))
    fp32 = work / "kt_state.onnx"
    export_state(head, fp32)
    variants = quantized_variants(fp32)
    results["op_types"] = {n: op_types(p) for n, p in variants.items()}
    results["op_types_after_ort_optimization"] = {n: optimized_op_types(p, 1) for n, p in variants.items()}
    results["file_kib"] = {n: round(p.stat().st_size / 1024, 1) for n, p in variants.items()}

    # timing: one realistic history of --length answers from real items
    items = rng.integers(0, len(dataset.items), args.length)
    feed = {
        "history": vectors[items][None].astype(np.float32),
        "history_correct": (rng.random((1, args.length)) < 0.6).astype(np.int64),
        "history_mask": np.ones((1, args.length), np.bool_),
    }
    results["timing"] = {}
    for threads in (1, 2):
        sessions = {n: _session(p.read_bytes(), ["CPUExecutionProvider"], threads) for n, p in variants.items()}
        results["timing"][f"threads={threads}"] = time_sessions(sessions, feed, args.calls, args.rounds)
        print(json.dumps({f"threads={threads}": results["timing"][f"threads={threads}"]}, indent=1), file=sys.stderr)

    # the cache-hit path: kt_step.onnx, one new answer from a cached (h, c)
    step_dir = work / "step"
    step_dir.mkdir()
    export_step(head, step_dir / "kt_step.onnx")
    step_variants = quantized_variants(step_dir / "kt_step.onnx")
    results["step_op_types_after_ort_optimization"] = {n: optimized_op_types(p, 1) for n, p in step_variants.items()}
    memory = np.zeros((head.lstm.num_layers, 1, head.hidden_dim), np.float32)
    step_feed = {
        "h": memory,
        "c": memory,
        "history": feed["history"][:, :1],
        "history_correct": feed["history_correct"][:, :1],
    }
    step_sessions = {n: _session(p.read_bytes(), ["CPUExecutionProvider"], 1) for n, p in step_variants.items()}
    results["step_timing"] = {"threads=1": time_sessions(step_sessions, step_feed, 4 * args.calls, args.rounds)}
    print(json.dumps({"step": results["step_timing"]}, indent=1), file=sys.stderr)

    # the cache's invariant: kt_state over a prefix then kt_step over the rest == kt_state over the whole history
    # (the export checks it to 1e-4 for fp32); per variant, with both graphs of that variant
    state_sessions = {n: _session(p.read_bytes(), ["CPUExecutionProvider"], 1) for n, p in variants.items()}
    continued: dict[str, float] = {n: 0.0 for n in variants}
    for _ in range(50):
        items = rng.integers(0, len(dataset.items), args.length)
        correct = (rng.random(args.length) < 0.6).astype(np.int64)
        for name in variants:
            history = vectors[items][None].astype(np.float32)
            whole = state_sessions[name].run(
                None,
                {
                    "history": history,
                    "history_correct": correct[None],
                    "history_mask": np.ones((1, args.length), np.bool_),
                },
            )[0]
            cut_at = args.length - 5
            _, h, c = state_sessions[name].run(
                None,
                {
                    "history": history[:, :cut_at],
                    "history_correct": correct[None, :cut_at],
                    "history_mask": np.ones((1, cut_at), np.bool_),
                },
            )
            for t in range(cut_at, args.length):
                got, h, c = step_sessions[name].run(
                    None,
                    {"h": h, "c": c, "history": history[:, t : t + 1], "history_correct": correct[None, t : t + 1]},
                )
            continued[name] = max(continued[name], float(np.abs(got - whole).max()))
    results["continued_vs_whole_state_max_abs"] = continued
    print(json.dumps({"continued_vs_whole_state_max_abs": continued}), file=sys.stderr)

    # accuracy: held-out students, every prefix (B = 1 as served), the next answer as target
    sessions = {n: _session(p.read_bytes(), ["CPUExecutionProvider"], 1) for n, p in variants.items()}
    preds: dict[str, list[float]] = {n: [] for n in variants}
    labels: list[int] = []
    for s in test:
        for t in range(1, len(s)):
            labels.append(int(s.correct[t]))
            for name, session in sessions.items():
                state = state_of(session, vectors, s.items[:t], s.correct[:t])
                preds[name].append(float(probabilities(parts, state, vectors[s.items[t]][None])[0]))
    y = np.array(labels)
    p = {n: np.array(v) for n, v in preds.items()}
    # torch reference for the fp32 graph (sanity): the head's own forward() over each whole sequence
    with torch.no_grad():
        torch_p = np.concatenate(
            [
                torch.sigmoid(head(torch.from_numpy(vectors[s.items])[None], torch.from_numpy(s.correct)[None]))[
                    0, 1:
                ].numpy()
                for s in test
            ]
        )
    results["heldout"] = {
        "predictions": len(y),
        "positive_rate": float(y.mean()),
        "torch_auc": auc(y, torch_p),
        "fp32_onnx_vs_torch_max_abs": float(np.abs(p["fp32"] - torch_p).max()),
        **{
            n: {
                "auc": auc(y, v),
                "max_abs_diff": float(np.abs(v - p["fp32"]).max()),
                "mean_abs_diff": float(np.abs(v - p["fp32"]).mean()),
                "p99_abs_diff": float(np.percentile(np.abs(v - p["fp32"]), 99)),
            }
            for n, v in p.items()
        },
    }

    # random --length histories of real items, each scored against the whole catalog
    diffs: dict[str, list[np.ndarray]] = {n: [] for n in variants if n != "fp32"}
    for _ in range(args.histories):
        items = rng.integers(0, len(dataset.items), args.length)
        correct = (rng.random(args.length) < 0.6).astype(np.int64)
        base = probabilities(parts, state_of(sessions["fp32"], vectors, items, correct), vectors)
        for name in diffs:
            diffs[name].append(
                np.abs(probabilities(parts, state_of(sessions[name], vectors, items, correct), vectors) - base)
            )
    results["random_histories"] = {
        n: {
            "histories": args.histories,
            "scores": int(sum(d.size for d in v)),
            "max_abs_diff": float(max(d.max() for d in v)),
            "mean_abs_diff": float(np.mean(np.concatenate(v))),
        }
        for n, v in diffs.items()
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
