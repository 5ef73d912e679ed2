"""Exports a checkpoint to an immutable, versioned ONNX artifact directory (layout: see service/bundle.py).

The directory is written under a hidden temporary name inside `out_root` and renamed into place at the end, so
a reader sees either no version or a complete one, and an existing version is never overwritten.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. For these models it is about 5x faster
than the dynamo exporter (about 1 s for all-MiniLM-L6-v2), needs no onnxscript, and keeps the batch, sequence,
history and candidate axes dynamic. The backbone is switched to eager attention for the export only: its graph
is smaller than the SDPA one (no NaN guards) and just as fast in ONNX Runtime; the weights are the same.
Every export is checked against PyTorch on inputs shaped unlike the tracing example before it is published.
A kt export also fits the calibration of the head's probabilities on the checkpoint's validation split
(trainer/calibration.py) and stores it beside the head's split output layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from gramrec.models.content_encoder import ContentEncoder, ItemTokens
from gramrec.service.artifact import (
    ENCODER_FILE,
    HEAD_FILE,
    ITEMS_EMBEDDINGS_FILE,
    ITEMS_INDEX_FILE,
    KT_CALIBRATION_FILE,
    KT_OUTPUT_FILE,
    KT_STATE_FILE,
    KT_STEP_FILE,
    TOKENIZER_DIR,
    is_valid_version,
    write_manifest,
)
from gramrec.service.errors import GramrecError
from gramrec.service.kt_scoring import KTCalibration
from gramrec.service.settings import VERSION_PATTERN
from gramrec.trainer.calibration import kt_calibration
from gramrec.trainer.checkpoint import TrainedModel, load_trained_model

log = logging.getLogger("gramrec.export")

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| / max(1, max |torch|), checked at export time
ENCODE_BATCH = 256  # items per encoder forward while building the item table


class ExportError(GramrecError, ValueError):
    """The export cannot proceed: bad version name, version already exists, or the ONNX graph is wrong."""


def default_version(task: str, now: datetime) -> str:
    """`<task>-<UTC yyyymmddTHHMMSS>-<6 hex>`: sorts by time, unique across concurrent exports."""
    return f"{task}-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def check_version(version: str, task: str) -> None:
    if not is_valid_version(version):
        raise ExportError(f"version {version!r} must match {VERSION_PATTERN} and contain no '..'")
    if not version.startswith(f"{task}-"):
        raise ExportError(f"version {version!r} must start with the task prefix '{task}-'")


def training_data_fingerprint(checkpoint: Path, settings: dict) -> str:
    """sha256 over the checkpoint's items.json bytes, a NUL byte, and the name of the training data folder.

    items.json holds every item id and text in index order, so it changes whenever the catalog does; the
    folder name tells data sets with the same catalog apart (e.g. two interaction logs over one item set).
    """
    digest = hashlib.sha256((Path(checkpoint) / "items.json").read_bytes())
    digest.update(b"\0" + Path(str(settings.get("data", ""))).name.encode())
    return f"sha256:{digest.hexdigest()}"


def export_checkpoint(
    checkpoint: Path,
    out_root: Path,
    version: str | None = None,
    metrics: dict | None = None,
    data_fingerprint: str | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Writes `out_root/<version>/` from a checkpoint and returns its path.

    metrics default to the checkpoint's validation metrics; data_fingerprint to `training_data_fingerprint`.
    A kt version's metrics also get the validation ECE before and after its calibration (val_ece_before/after).
    device runs the item-table encoding ("auto": CUDA if available); the ONNX export itself runs on CPU.
    Raises ExportError if the version is invalid or already exists (artifacts are immutable).
    """
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    started = time.perf_counter()
    now = datetime.now(UTC)
    with _quiet_hugging_face():
        model = load_trained_model(checkpoint)
    version = version or default_version(model.task, now)
    check_version(version, model.task)
    target = out_root / version
    if target.exists() or target.is_symlink():
        raise ExportError(f"{target}: version already exists; artifact versions are immutable")
    out_root.mkdir(parents=True, exist_ok=True)
    has_encoder = model.strategy != "nocontent"

    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=out_root))  # hidden: never listed
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the service may run as another user
        parity = {}
        embeddings = _item_table(model, has_encoder, _resolve_device(device), progress)
        _write_items(tmp, model, embeddings)
        log.info("items encoded", extra={"items": len(model.items), "seconds": time.perf_counter() - started})
        calibration, calibration_fit = kt_calibration(model, embeddings) if model.task == "kt" else (None, {})
        if calibration is not None:
            _write_calibration(tmp, calibration, calibration_fit)
        onnx_started = time.perf_counter()
        if has_encoder:
            model.encoder.backbone.set_attn_implementation("eager")  # export only; see the module docstring
            parity["encoder"] = _export_encoder(model.encoder, tmp / ENCODER_FILE)
            with _quiet_hugging_face():
                model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        parity["head"] = _export_head(model, tmp / HEAD_FILE)
        if model.task == "kt":
            parity["kt_parts"] = _export_kt_parts(model, tmp)
        log.info("onnx exported", extra={"parity": parity, "seconds": time.perf_counter() - onnx_started})
        manifest = _manifest(model, checkpoint, version, now, has_encoder, parity, metrics, data_fingerprint)
        if model.task == "kt":
            manifest |= _calibration_entries(calibration, calibration_fit, manifest["metrics"])
        manifest["golden"] = _golden(model, embeddings, has_encoder, calibration)
        _make_world_readable(tmp)
        write_manifest(tmp, manifest)
        if target.exists():  # created meanwhile by a concurrent export
            raise ExportError(f"{target}: version already exists; artifact versions are immutable")
        os.rename(tmp, target)  # atomic on one filesystem
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported", extra={"version": version, "path": str(target), "seconds": time.perf_counter() - started})
    return target


@contextmanager
def _quiet_hugging_face() -> Iterator[None]:
    """Hugging Face prints a load report and progress bars on every load; an export prints only its result."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- item table -------------------------------------------------------------------------------------------
def _item_table(model: TrainedModel, has_encoder: bool, device: torch.device, progress: bool) -> torch.Tensor:
    """Every item's embedding [N, D] float32: the eval-mode encoder's output, or the learned id embeddings."""
    if not has_encoder:
        return model.strategy_tensors["id_embedding"].float()
    saved = model.strategy_tensors.get("table")
    if model.strategy == "nofinetune" and saved is not None and saved.dtype == torch.float32:
        if tuple(saved.shape) == (len(model.items), model.encoder.dim):  # frozen encoder: training's float32 rows
            log.info("item table reused from the checkpoint", extra={"items": len(model.items)})
            return saved.cpu()
    tokens = ItemTokens.from_texts(model.tokenizer, model.items.texts, model.max_tokens)
    encoder = model.encoder.to(device)
    try:
        # Full precision: serving's ONNX encoder is float32 too, so table rows and cold-start items agree.
        with torch.no_grad():
            table = encoder.encode(tokens, torch.arange(len(tokens)), ENCODE_BATCH, progress=progress, autocast=False)
        return table.float().cpu()
    finally:
        model.encoder.cpu()


def _write_items(directory: Path, model: TrainedModel, embeddings: torch.Tensor) -> None:
    array = embeddings.detach().cpu().float().contiguous().numpy()  # [N, D]
    save_file({"embeddings": array}, str(directory / ITEMS_EMBEDDINGS_FILE))
    index: dict = {"ids": model.items.ids, "texts": model.items.texts}
    if model.items.metadata is not None:
        index["metadata"] = model.items.metadata  # category/subcategory per item, served by POST /recommend
    (directory / ITEMS_INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False))


# -- ONNX graphs ------------------------------------------------------------------------------------------
class KnowledgeTracingServing(nn.Module):
    """Exposes KnowledgeTracingHead.predict_next as forward(), the function torch.onnx.export traces."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(
        self, history: torch.Tensor, history_correct: torch.Tensor, history_mask: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """history [B, T, D], history_correct [B, T] int64, history_mask [B, T] bool, targets [B, K, D] -> [B, K]"""
        return self.head.predict_next(history, history_correct, history_mask, targets)  # type: ignore[operator]


class KnowledgeTracingState(nn.Module):
    """Exposes KnowledgeTracingHead.history_state_and_memory as forward(): the state a catalog-wide kt scoring starts
    from, and the LSTM memory (h, c) the per-student state cache continues with kt_step.onnx."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(
        self, history: torch.Tensor, history_correct: torch.Tensor, history_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """history [B, T, D], history_correct [B, T] int64, history_mask [B, T] bool -> state [B, H], h and c
        [layers, B, H]"""
        return self.head.history_state_and_memory(history, history_correct, history_mask)  # type: ignore[operator]


class KnowledgeTracingStep(nn.Module):
    """Exposes KnowledgeTracingHead.continue_state as forward(): a student's state moved on by new answers.

    An ONNX graph rather than the LSTM's weights for a numpy step: measured on the 2-core box (H = 128, 2 layers,
    one answer, process CPU time), ONNX Runtime takes 30-37 us a step and a numpy step with the item projection
    folded into the first layer 51 us; and the graph is PyTorch's own LSTM, so no second implementation of its
    gates has to be kept equal to it.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, history: torch.Tensor, history_correct: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h, c [layers, B, H], history [B, T >= 1, D], history_correct [B, T] int64 -> state [B, H], next h, c"""
        return self.head.continue_state(history, history_correct, h, c)  # type: ignore[operator]


def _export_kt_parts(model: TrainedModel, directory: Path) -> float:
    """kt_state.onnx (the LSTM state and memory after a history), kt_step.onnx (the state continued by new answers)
    and kt_output.safetensors (the output layer's student and question parts). Checked against predict_next: the
    parts must give the head's logits, and a state continued from a prefix's memory the whole history's state."""
    dim = model.encoder.dim
    g = torch.Generator().manual_seed(1)
    state_module = KnowledgeTracingState(model.head).eval()
    names = ["history", "history_correct", "history_mask"]
    axes = {"history": {0: "B", 1: "T"}, "history_correct": {0: "B", 1: "T"}, "history_mask": {0: "B", 1: "T"}}
    memory_axes = {"h": {1: "B"}, "c": {1: "B"}}

    def sample(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length // 2 + 1 :] = False
        return torch.randn(batch, length, dim, generator=g), torch.randint(0, 2, (batch, length), generator=g), mask

    outputs = ["state", "h", "c"]
    _onnx_export(
        state_module, sample(2, 7), directory / KT_STATE_FILE, names, outputs, axes | {"state": {0: "B"}} | memory_axes
    )
    error = _check_parity(state_module, directory / KT_STATE_FILE, names, sample(3, 11), outputs)
    error = max(error, _export_kt_step(model, directory, sample))
    with torch.no_grad():
        parts = {k: v.detach().float().contiguous().cpu() for k, v in model.head.output_parts().items()}  # type: ignore[operator]
        history, correct, mask = sample(3, 11)
        targets = torch.randn(3, 6, dim, generator=g)
        expected = model.head.predict_next(history, correct, mask, targets)  # type: ignore[operator]
        state = model.head.history_state(history, correct, mask)  # type: ignore[operator]
        hidden = (state @ parts["state_weight"].T)[:, None] + targets @ parts["item_weight"].T + parts["item_bias"]
        got = torch.relu(hidden) @ parts["out_weight"] + parts["out_bias"]
    error = max(error, float((got - expected).abs().max() / max(1.0, float(expected.abs().max()))))
    if not error <= PARITY_TOLERANCE:
        raise ExportError(f"{KT_OUTPUT_FILE}: the split output layer differs from the head by {error:.3g}")
    save_file({k: v.numpy() for k, v in parts.items()}, str(directory / KT_OUTPUT_FILE))
    return error


def _export_kt_step(model: TrainedModel, directory: Path, sample: Callable[[int, int], tuple]) -> float:
    """kt_step.onnx, checked in ONNX Runtime: kt_state over a prefix, then kt_step over the rest, must give
    kt_state's state and memory over the whole (unpadded) history."""
    import onnxruntime as ort

    step_module = KnowledgeTracingStep(model.head).eval()
    lstm = cast(nn.LSTM, model.head.lstm)
    layers, hidden = lstm.num_layers, lstm.hidden_size
    names = ["h", "c", "history", "history_correct"]
    axes = {"h": {1: "B"}, "c": {1: "B"}, "history": {0: "B", 1: "T"}, "history_correct": {0: "B", 1: "T"}}
    axes |= {"state": {0: "B"}, "next_h": {1: "B"}, "next_c": {1: "B"}}
    history, correct, _ = sample(2, 3)
    memory = torch.zeros(layers, 2, hidden)
    _onnx_export(
        step_module,
        (memory, memory, history, correct),
        directory / KT_STEP_FILE,
        names,
        ["state", "next_h", "next_c"],
        axes,
    )
    full = ort.InferenceSession(str(directory / KT_STATE_FILE), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(directory / KT_STEP_FILE), providers=["CPUExecutionProvider"])
    history, correct, _ = (t.numpy() for t in sample(2, 12))
    mask = np.ones(correct.shape, np.bool_)
    expected = full.run(None, {"history": history, "history_correct": correct, "history_mask": mask})
    prefix = {"history": history[:, :9], "history_correct": correct[:, :9], "history_mask": mask[:, :9]}
    _, h, c = full.run(None, prefix)
    for t in range(9, 12):  # one answer at a time, as the cache steps a growing history
        got = step.run(
            None, {"h": h, "c": c, "history": history[:, t : t + 1], "history_correct": correct[:, t : t + 1]}
        )
        h, c = got[1], got[2]
    error = max(
        float(np.abs(g - e).max() / max(1.0, float(np.abs(e).max()))) for g, e in zip(got, expected, strict=True)
    )
    if not error <= PARITY_TOLERANCE:  # also catches NaN
        raise ExportError(f"{KT_STEP_FILE}: a continued state differs from the whole history's by {error:.3g}")
    return error


def _write_calibration(directory: Path, calibration: KTCalibration, fit: dict) -> None:
    """kt_calibration.json: the config the service reads (method, a, b) and how it was fitted (answers, ECE)."""
    record = calibration.to_dict() | {k: v for k, v in fit.items() if k not in ("method", "a", "b")}
    (directory / KT_CALIBRATION_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))


def _calibration_entries(calibration: KTCalibration | None, fit: dict, metrics: dict) -> dict:
    """The manifest's kt_calibration (its file, or None: served uncalibrated), the fit's record (with the reason
    when there is none), and metrics with the validation ECE before and after."""
    entries = {"kt_calibration": KT_CALIBRATION_FILE if calibration is not None else None, "kt_calibration_fit": fit}
    if calibration is not None:
        entries["metrics"] = metrics | {"val_ece_before": fit["val_ece_before"], "val_ece_after": fit["val_ece_after"]}
    return entries


def _export_encoder(encoder: ContentEncoder, path: Path) -> float:
    """encoder.onnx: input_ids, attention_mask [batch, sequence] int64 -> embedding [batch, D] (pooled)."""
    vocab = encoder.backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def sample(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.randint(min(1000, vocab - 1), vocab, (batch, length), generator=g)
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[0, length // 2 + 1 :] = 0  # one padded row, so the mask path is traced
        return input_ids, attention_mask

    names = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    _onnx_export(encoder, sample(2, 7), path, names, ["embedding"], axes | {"embedding": {0: "batch"}})
    return _check_parity(encoder, path, names, sample(5, 13), "embedding")


def _export_head(model: TrainedModel, path: Path) -> float:
    """head.onnx: KT predict_next or NRMS forward, with every batch, history and target axis dynamic."""
    dim = model.encoder.dim
    g = torch.Generator().manual_seed(0)

    def history(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length // 2 + 1 :] = False  # real steps first, padding after
        return torch.randn(batch, length, dim, generator=g), mask

    if model.task == "kt":
        module = KnowledgeTracingServing(model.head).eval()
        names = ["history", "history_correct", "history_mask", "targets"]
        axes = {
            "history": {0: "B", 1: "T"},
            "history_correct": {0: "B", 1: "T"},
            "history_mask": {0: "B", 1: "T"},
            "targets": {0: "B", 1: "K"},
            "logits": {0: "B", 1: "K"},
        }

        def sample(batch: int, length: int, k: int) -> tuple[torch.Tensor, ...]:
            steps, mask = history(batch, length)
            correct = torch.randint(0, 2, (batch, length), generator=g)
            return steps, correct, mask, torch.randn(batch, k, dim, generator=g)

        output = "logits"
    else:
        module = model.head  # type: ignore[assignment]  # NewsHead's forward is the serving signature
        names = ["history", "history_mask", "candidates"]
        axes = {
            "history": {0: "B", 1: "L"},
            "history_mask": {0: "B", 1: "L"},
            "candidates": {0: "B", 1: "C"},
            "scores": {0: "B", 1: "C"},
        }

        def sample(batch: int, length: int, k: int) -> tuple[torch.Tensor, ...]:
            return *history(batch, length), torch.randn(batch, k, dim, generator=g)

        output = "scores"
    _onnx_export(module, sample(2, 7, 3), path, names, [output], axes)
    return _check_parity(module, path, names, sample(5, 13, 4), output)


GOLDEN_ITEMS = 4


def _golden(
    model: TrainedModel, embeddings: torch.Tensor, has_encoder: bool, calibration: KTCalibration | None = None
) -> dict:
    """A fixed request and PyTorch's answer to it: a server checks a freshly loaded bundle against it before
    swapping it in, so an artifact that loads but computes something else never serves (see ModelBundle).
    kt's answer is the calibrated probability, as served."""
    n = min(GOLDEN_ITEMS, len(model.items))
    items = list(range(n))
    table = embeddings.float()
    history = table[items][None]  # [1, n, D]
    mask = torch.ones(1, n, dtype=torch.bool)
    golden: dict = {"history": [model.items.ids[i] for i in items], "targets": [model.items.ids[i] for i in items]}
    with torch.no_grad():
        if model.task == "kt":
            correct = torch.tensor([[i % 2 for i in items]])
            logits = KnowledgeTracingServing(model.head).eval().float()(history, correct, mask, history)
            if calibration is not None:
                logits = calibration.a * logits + calibration.b
            golden |= {"history_correct": correct[0].tolist(), "expected": torch.sigmoid(logits)[0].tolist()}
        else:
            golden["expected"] = model.head.eval().float()(history, mask, history)[0].tolist()
    if has_encoder:
        golden["texts"] = [model.items.texts[i] for i in items[:2]]  # their rows in the item table are expected
    return golden


def _onnx_export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    """Traces `module` in eval mode on CPU; the tracer's warnings about constant Python values are expected."""
    module.eval().float().cpu()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _check_parity(module: nn.Module, path: Path, names: list[str], args: tuple, output: str | list[str]) -> float:
    """Relative max difference between ONNX Runtime and PyTorch on new shapes (over every output named; a module
    with several returns them as a tuple in that order); raises ExportError if too big."""
    import onnxruntime as ort

    outputs = [output] if isinstance(output, str) else output
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        returned = module(*args)
    expected = [t.numpy() for t in (returned if isinstance(returned, tuple) else (returned,))]
    got = session.run(outputs, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    error = max(
        float(np.abs(g - e).max() / max(1.0, float(np.abs(e).max()))) for g, e in zip(got, expected, strict=True)
    )
    if not error <= PARITY_TOLERANCE:  # also catches NaN
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {error:.3g} (> {PARITY_TOLERANCE})")
    return error


# -- manifest ---------------------------------------------------------------------------------------------
def _make_world_readable(directory: Path) -> None:
    """Some writers (safetensors, mkdtemp) create owner-only files; a served artifact is read by other users."""
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _manifest(
    model: TrainedModel,
    checkpoint: Path,
    version: str,
    now: datetime,
    has_encoder: bool,
    parity: dict[str, float],
    metrics: dict | None,
    data_fingerprint: str | None,
) -> dict:
    tokenizer = model.tokenizer
    return {
        "version": version,
        "created": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),  # microseconds: versions of one second still order
        "task": model.task,
        "strategy": model.strategy,
        "dim": int(model.encoder.dim),
        "max_tokens": model.max_tokens,
        "pooling": model.encoder.pooling if has_encoder else None,
        "model": model.config["model"],  # the encoder's and the head's config (models/configs.py)
        "encoder": ENCODER_FILE if has_encoder else None,
        "head": HEAD_FILE,
        "kt_parts": (
            {"state": KT_STATE_FILE, "output": KT_OUTPUT_FILE, "step": KT_STEP_FILE} if model.task == "kt" else None
        ),
        "tokenizer": (
            {"dir": TOKENIZER_DIR, "pad_token": tokenizer.pad_token, "pad_token_id": int(tokenizer.pad_token_id)}
            if has_encoder
            else None
        ),
        "items": {"count": len(model.items), "embeddings": ITEMS_EMBEDDINGS_FILE, "index": ITEMS_INDEX_FILE},
        "metrics": metrics if metrics is not None else model.config.get("val_metrics", {}),
        "data_fingerprint": data_fingerprint or training_data_fingerprint(checkpoint, model.config["settings"]),
        "source_checkpoint": str(checkpoint.resolve()),
        "onnx": {"opset": OPSET, "exporter": "torchscript", "torch": torch.__version__, "parity": parity},
    }
