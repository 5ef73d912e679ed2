"""One exported model version, verified and ready to serve: ONNX encoder and CF head, tokenizer, item table.

The directory layout, the manifest and its checks live in service/artifact.py, shared with trainer/export.py.

This module needs only numpy, onnxruntime, tokenizers and safetensors (no torch), so a serving image stays small.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

from gramrec.service.artifact import (
    ENCODER_FILE,
    HEAD_FILE,
    ITEMS_EMBEDDINGS_FILE,
    ITEMS_INDEX_FILE,
    MANIFEST,
    TOKENIZER_DIR,
    ArtifactError,
    read_manifest,
    resolve_version_dir,
    verified_files,
)
from gramrec.service.kt_scoring import IDENTITY, KTCalibration, KTOutputLayer

log = logging.getLogger("gramrec.bundle")

GOLDEN_TOLERANCE = 1e-3  # ONNX Runtime vs PyTorch at export is checked to 1e-4; a loaded bundle must stay close
ENCODE_BATCH = 64  # texts per encoder run; texts are sorted by length first so each batch pads little


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (CPU stays as the fallback for unsupported ops), else CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Intra-op threads per ONNX Runtime session unless the caller gives a number (the service passes
# ServiceSettings.ort_threads, i.e. GRAMREC_ORT_THREADS). Measured on 2 cores: a second thread helps an idle box
# (MiniLM encode 5.0 -> 3.5 ms, KT T=100 3.5 -> 3.1 ms) but its spinning costs 2.5x once the cores are busy
# (concurrent requests), while one thread stays within 20% of idle. Requests run concurrently in the service, so
# 1 is the robust default.
DEFAULT_THREADS = 1


def _required(contents: dict[str, bytes], directory: Path, name: str) -> bytes:
    if name not in contents:
        raise ArtifactError(directory / name, "required by the manifest but not listed in its files")
    return contents[name]


def _session(model: bytes, providers: list[str], threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-session optimizer chatter in the service log
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _tokenizer(contents: dict[str, bytes], directory: Path, manifest: dict) -> Tokenizer:
    """The fast tokenizer, set to truncate at max_tokens and pad to the longest text of a batch."""
    info = manifest.get("tokenizer")
    if not isinstance(info, dict):
        raise ArtifactError(directory / MANIFEST, "has an encoder but no tokenizer entry")
    name = f"{TOKENIZER_DIR}/tokenizer.json"
    try:
        return _configured_tokenizer(
            _required(contents, directory, name),
            manifest["max_tokens"],
            int(info["pad_token_id"]),
            str(info["pad_token"]),
        )
    except ArtifactError:
        raise
    except Exception as exc:  # the Rust parser raises plain Exception subclasses
        raise ArtifactError(directory / name, f"not a valid fast tokenizer: {exc}") from None


@functools.lru_cache(maxsize=8)
def _configured_tokenizer(definition: bytes, max_tokens: int, pad_id: int, pad_token: str) -> Tokenizer:
    """Parsing a tokenizer holds the GIL for ~15 ms, which requests being served would feel during a hot swap;
    retrained versions share their tokenizer, so it is parsed once. Never mutated after this (encode is &self)."""
    tokenizer = Tokenizer.from_str(definition.decode("utf-8"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def _item_table(
    contents: dict[str, bytes], directory: Path, dim: int
) -> tuple[list[str], list[str], np.ndarray, list[dict] | None]:
    try:
        index = json.loads(_required(contents, directory, ITEMS_INDEX_FILE))
        ids = [str(i) for i in index["ids"]]
        texts = [str(t) for t in index.get("texts", [])]
        metadata = index.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, list)
            or len(metadata) != len(ids)
            or not all(isinstance(m, dict) for m in metadata)
        ):
            raise ValueError("metadata must be one object per item")
        embeddings = load_safetensors(_required(contents, directory, ITEMS_EMBEDDINGS_FILE))["embeddings"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(directory / ITEMS_EMBEDDINGS_FILE, f"unreadable item table: {exc}") from None
    if embeddings.dtype != np.float32 or embeddings.shape != (len(ids), dim):
        raise ArtifactError(
            directory / ITEMS_EMBEDDINGS_FILE,
            f"embeddings {embeddings.dtype}{list(embeddings.shape)}, expected float32[{len(ids)}, {dim}]",
        )
    if texts and len(texts) != len(ids):
        raise ArtifactError(directory / ITEMS_INDEX_FILE, f"{len(texts)} texts for {len(ids)} item ids")
    return ids, texts, embeddings, metadata


def _kt_output(contents: dict[str, bytes], directory: Path, parts: object, dim: int) -> KTOutputLayer:
    if (
        not isinstance(parts, dict)
        or not isinstance(parts.get("state"), str)
        or not isinstance(parts.get("output"), str)
    ):
        raise ArtifactError(directory / MANIFEST, "kt_parts must name its state and output files")
    try:
        return KTOutputLayer.from_bytes(_required(contents, directory, parts["output"]), dim)
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors' and our own shape errors
        raise ArtifactError(directory / parts["output"], f"unreadable kt output layer: {exc}") from None


def _kt_calibration(contents: dict[str, bytes], directory: Path, name: object) -> KTCalibration:
    """The manifest's kt_calibration file; absent (a version exported before calibration): the identity."""
    if name is None:
        return IDENTITY
    if not isinstance(name, str):
        raise ArtifactError(directory / MANIFEST, "kt_calibration must name its file")
    try:
        return KTCalibration.from_bytes(_required(contents, directory, name))
    except ArtifactError:
        raise
    except ValueError as exc:
        raise ArtifactError(directory / name, f"invalid kt calibration: {exc}") from None


def _matrix(name: str, array: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] float32, C-contiguous (copies only when the caller's array is not already so)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(array.shape)}")
    return array


class ModelBundle:
    """A verified artifact version with its ONNX Runtime sessions; the service's inference entry point.

    Build one with `ModelBundle.load`. Inference methods are thread-safe (ONNX Runtime sessions are).
    """

    version: str
    task: str
    strategy: str
    dim: int
    max_tokens: int
    manifest: dict
    has_encoder: bool

    def __init__(
        self,
        path: Path,
        manifest: dict,
        encoder: ort.InferenceSession | None,
        head: ort.InferenceSession,
        tokenizer: Tokenizer | None,
        item_ids: list[str],
        item_vectors: np.ndarray,
        item_meta: list[dict] | None = None,
        item_texts: list[str] | None = None,
        kt_state: ort.InferenceSession | None = None,
        kt_output: KTOutputLayer | None = None,
        kt_calibration: KTCalibration = IDENTITY,
        kt_step: ort.InferenceSession | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.version = manifest["version"]
        self.task = manifest["task"]
        self.strategy = manifest["strategy"]
        self.dim = manifest["dim"]
        self.max_tokens = manifest["max_tokens"]
        self.has_encoder = encoder is not None
        self._encoder = encoder
        self._head = head
        self._tokenizer = tokenizer
        self._item_ids = item_ids
        self._item_vectors = item_vectors
        self._item_meta = item_meta
        self._item_texts = dict(zip(item_ids, item_texts, strict=True)) if item_texts else {}
        self._kt_state = kt_state
        self._kt_step = kt_step  # set: a student's state can be continued from its memory (service/kt_cache.py)
        self.kt_calibration = kt_calibration  # applied to every kt probability served, by both paths below
        # kt exported with its head split: catalog-wide scoring (service/kt_scoring.py), with the same calibration
        self.kt_output = replace(kt_output, calibration=kt_calibration) if kt_output is not None else None
        # An empty history runs as one padding step (mask False): the head then uses its start state (kt) or a
        # zero user vector (nr), exactly as PyTorch does for an all-padding row. Built once, reused per call.
        self._no_history = np.zeros((1, 1, self.dim), np.float32)  # [1, 1, D]
        self._no_history_correct = np.zeros((1, 1), np.int64)  # [1, 1]
        self._no_history_mask = np.zeros((1, 1), np.bool_)  # [1, 1]

    @classmethod
    def load(
        cls,
        artifacts_root: Path,
        version: str,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> ModelBundle:
        """Verifies `artifacts_root/version` completely, then creates its sessions.

        Raises ArtifactError (naming the file and the problem) for a bad version name, a directory outside
        the root, a malformed manifest, or any file whose size or sha256 differs from the manifest; all of
        that is checked before any ONNX Runtime session is created.
        """
        directory = resolve_version_dir(artifacts_root, version)
        manifest = read_manifest(directory)
        contents = verified_files(directory, manifest)
        item_ids, item_texts, item_vectors, item_meta = _item_table(contents, directory, manifest["dim"])
        has_encoder = manifest.get("encoder") is not None
        tokenizer = _tokenizer(contents, directory, manifest) if has_encoder else None

        providers = providers or default_providers()
        threads = intra_op_threads or DEFAULT_THREADS
        encoder_model = _required(contents, directory, ENCODER_FILE) if has_encoder else None
        head_model = _required(contents, directory, HEAD_FILE)
        parts = manifest.get("kt_parts")
        kt_output = _kt_output(contents, directory, parts, manifest["dim"]) if parts else None
        kt_calibration = _kt_calibration(contents, directory, manifest.get("kt_calibration"))
        step = parts.get("step") if parts else None  # absent: exported before the state cache, served without it
        if step is not None and not isinstance(step, str):
            raise ArtifactError(directory / MANIFEST, "kt_parts' step must name its file")
        try:
            encoder = _session(encoder_model, providers, threads) if encoder_model is not None else None
            head = _session(head_model, providers, threads)
            kt_state = _session(_required(contents, directory, parts["state"]), providers, threads) if parts else None
            kt_step = _session(_required(contents, directory, step), providers, threads) if step else None
        except ArtifactError:
            raise
        except Exception as exc:  # onnxruntime reports invalid models as generic runtime errors
            raise ArtifactError(directory, f"ONNX Runtime cannot load a model: {exc}") from None
        log.info("bundle loaded", extra={"version": version, "providers": providers, "threads": threads})
        return cls(
            directory,
            manifest,
            encoder,
            head,
            tokenizer,
            item_ids,
            item_vectors,
            item_meta,
            item_texts,
            kt_state=kt_state,
            kt_output=kt_output,
            kt_calibration=kt_calibration,
            kt_step=kt_step,
        )

    # -- inference -----------------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Item texts -> embeddings [n, D] float32, as the trained content encoder computes them."""
        if self._encoder is None or self._tokenizer is None:
            raise ArtifactError(self.path, f"strategy {self.strategy!r} has no content encoder: cannot encode text")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if len(texts) == 1:  # the common request; skips the batch machinery
            return self._encode_batch([self._tokenizer.encode(texts[0])])
        encodings = self._tokenizer.encode_batch(list(texts))  # padded to the longest text; re-padded per chunk
        order = np.argsort([sum(e.attention_mask) for e in encodings], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(order), ENCODE_BATCH):
            chunk = order[start : start + ENCODE_BATCH]
            out[chunk] = self._encode_batch([encodings[i] for i in chunk])
        return out

    def _encode_batch(self, encodings: list) -> np.ndarray:
        """Tokenizer encodings -> [n, D], trimmed to the longest real length among them."""
        width = max(sum(e.attention_mask) for e in encodings)
        input_ids = np.array([e.ids[:width] for e in encodings], dtype=np.int64)  # [n, S]
        attention_mask = np.array([e.attention_mask[:width] for e in encodings], dtype=np.int64)  # [n, S]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self._encoder.run(["embedding"], feed)[0]  # type: ignore[union-attr]

    def predict_kt(self, history: np.ndarray, history_correct: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Calibrated P(correct) for answering each target next, after the answered history.

        history: [T, D] (T may be 0), history_correct: [T] (0/1), targets: [K, D] -> probabilities [K] float32.
        """
        return self.kt_calibration.probabilities(self.kt_logits(history, history_correct, targets))

    def kt_logits(self, history: np.ndarray, history_correct: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The head's logits before calibration (predict_kt's arguments) -> [K] float32."""
        self._require_task("kt")
        history = _matrix("history", history, self.dim)
        targets = _matrix("targets", targets, self.dim)
        correct = np.asarray(history_correct, dtype=np.int64).reshape(-1)
        if correct.shape[0] != history.shape[0]:
            raise ValueError(f"history_correct has {correct.shape[0]} entries for {history.shape[0]} history items")
        if targets.shape[0] == 0:
            return np.zeros(0, np.float32)
        if history.shape[0] == 0:
            steps, correct, mask = self._no_history, self._no_history_correct, self._no_history_mask  # type: ignore[assignment]
        else:
            steps, correct, mask = history[None], correct[None], np.ones((1, history.shape[0]), np.bool_)
        feed = {"history": steps, "history_correct": correct, "history_mask": mask, "targets": targets[None]}
        return self._head.run(["logits"], feed)[0][0]  # [K]

    def kt_state(self, history: np.ndarray, history_correct: np.ndarray) -> np.ndarray:
        """The LSTM state after the answered history ([T, D], [T]; T may be 0) -> [H], for kt_output's scoring."""
        return self._run_kt_state(history, history_correct)[0][0]  # [H]

    @property
    def kt_continues(self) -> bool:
        """Whether a student's state can be continued from its memory (kt_step.onnx; versions exported before the
        per-student state cache have none and serve without it)."""
        return self._kt_step is not None and self._kt_state is not None

    def kt_memory(self, history: np.ndarray, history_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(state [H], memory [2, layers, H]: the LSTM's h and c) after a history of T >= 1 answers."""
        if history.shape[0] == 0:
            raise ValueError("the memory after no answers is zeros; kt_state gives the start state")
        state, h, c = self._run_kt_state(history, history_correct)
        return state[0], np.stack([h[:, 0], c[:, 0]])

    def kt_continue(
        self, memory: np.ndarray, history: np.ndarray, history_correct: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """kt_memory after earlier answers, whose memory is given, and these T >= 1 new ones ([T, D], [T])."""
        if self._kt_step is None:
            raise ArtifactError(self.path, "was exported without kt_step.onnx")
        history, correct = self._checked_history(history, history_correct)
        feed = {
            "h": memory[0][:, None],
            "c": memory[1][:, None],
            "history": history[None],
            "history_correct": correct[None],
        }
        state, h, c = self._kt_step.run(None, feed)
        return state[0], np.stack([h[:, 0], c[:, 0]])

    def _run_kt_state(self, history: np.ndarray, history_correct: np.ndarray) -> list[np.ndarray]:
        """kt_state.onnx over one history: [state [1, H]] (versions before the cache), or with h and c [layers, 1, H]."""
        self._require_task("kt")
        if self._kt_state is None:
            raise ArtifactError(self.path, "was exported without its split kt head (kt_parts)")
        history, correct = self._checked_history(history, history_correct)
        if history.shape[0] == 0:
            steps, correct, mask = self._no_history, self._no_history_correct, self._no_history_mask
        else:
            steps, correct, mask = history[None], correct[None], np.ones((1, history.shape[0]), np.bool_)
        feed = {"history": steps, "history_correct": correct, "history_mask": mask}
        return self._kt_state.run(None, feed)

    def _checked_history(self, history: np.ndarray, history_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = _matrix("history", history, self.dim)
        correct = np.asarray(history_correct, dtype=np.int64).reshape(-1)
        if correct.shape[0] != history.shape[0]:
            raise ValueError(f"history_correct has {correct.shape[0]} entries for {history.shape[0]} history items")
        return history, correct

    def score_news(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Click scores (dot products, higher = more likely) of each candidate for a reader.

        history: [L, D] clicked-news embeddings (L may be 0: every score is then 0), candidates: [C, D] -> [C].
        """
        self._require_task("nr")
        history = _matrix("history", history, self.dim)
        candidates = _matrix("candidates", candidates, self.dim)
        if candidates.shape[0] == 0:
            return np.zeros(0, np.float32)
        if history.shape[0] == 0:
            clicks, mask = self._no_history, self._no_history_mask
        else:
            clicks, mask = history[None], np.ones((1, history.shape[0]), np.bool_)
        feed = {"history": clicks, "history_mask": mask, "candidates": candidates[None]}
        return self._head.run(["scores"], feed)[0][0]  # [C]

    def item_embeddings(self) -> tuple[list[str], np.ndarray]:
        """Item ids and their embeddings [N, D] float32 (same order), to fill the service's item table."""
        return list(self._item_ids), self._item_vectors

    def item_metadata(self) -> list[dict] | None:
        """Metadata of each item of the table (same order; MIND: category, subcategory), or None if exported without."""
        return self._item_meta

    def catalog_ids(self) -> Sequence[str]:
        """The ids of the items the model came with, in the artifact's order (read-only)."""
        return self._item_ids

    def catalog_text(self, item_id: str) -> str | None:
        """The dataset's text of an item the model came with; None for others."""
        return self._item_texts.get(item_id)

    def warm_up(self) -> None:
        """Runs every session once on a typical input, so the first request does not pay for lazy setup."""
        if self.has_encoder:
            self.encode_texts(["a short warm-up text about fractions, loops and the news"])
        history = np.zeros((20, self.dim), np.float32)
        if self.task == "kt":
            self.predict_kt(history, np.zeros(20, np.int64), np.zeros((4, self.dim), np.float32))
        else:
            self.score_news(history, np.zeros((4, self.dim), np.float32))

    def self_check(self, tolerance: float = GOLDEN_TOLERANCE) -> None:
        """Answers the manifest's golden request and compares with what PyTorch answered at export.

        Raises ArtifactError on a difference beyond `tolerance` (relative to max(1, |expected|)) or a non-finite
        output. A bundle exported before golden requests existed passes if its outputs are finite. kt's expected
        probabilities are the calibrated ones, so a calibration file that loads but differs never serves either.
        """
        golden = self.manifest.get("golden")
        if not golden:
            return
        index = {item_id: i for i, item_id in enumerate(self._item_ids)}
        try:
            history = self._item_vectors[[index[i] for i in golden["history"]]]
            targets = self._item_vectors[[index[i] for i in golden["targets"]]]
        except KeyError as exc:
            raise ArtifactError(
                self.path, f"golden request names item {exc.args[0]!r}, absent from the table"
            ) from None
        expected = np.asarray(golden["expected"], np.float32)
        if self.task == "kt":
            got = self.predict_kt(history, np.asarray(golden["history_correct"]), targets)
            if self.kt_output is not None:  # the split head must answer what the head answers
                state = self.kt_state(history, np.asarray(golden["history_correct"]))
                split = self.kt_output.probabilities(state, self.kt_output.item_terms(targets))
                _compare(self.path, "kt_parts", split, expected, tolerance)
        else:
            got = self.score_news(history, targets)
        _compare(self.path, "head", got, expected, tolerance)
        if self.has_encoder and golden.get("texts"):
            texts = golden["texts"]
            _compare(self.path, "encoder", self.encode_texts(texts), self._item_vectors[: len(texts)], tolerance)

    def _require_task(self, task: str) -> None:
        if self.task != task:
            raise ArtifactError(self.path, f"is a {self.task!r} model; this call needs a {task!r} model")

    def __repr__(self) -> str:
        return f"ModelBundle(version={self.version!r}, task={self.task!r}, strategy={self.strategy!r}, dim={self.dim})"


def _compare(path: Path, part: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    got = np.asarray(got, np.float32)
    if got.shape != expected.shape:
        raise ArtifactError(
            path, f"golden check: {part} gives shape {list(got.shape)}, expected {list(expected.shape)}"
        )
    error = float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))) if got.size else 0.0
    if not error <= tolerance:  # NaN fails too
        raise ArtifactError(path, f"golden check: {part} output differs from the exported reference by {error:.3g}")
