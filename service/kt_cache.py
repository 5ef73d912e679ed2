"""A per-student LSTM state cache for kt: a client that resends a growing history pays one LSTM step per new answer.

The served state after T answers is the LSTM's output over the whole history from a zero (h, c), with no window, so
the state after H + [a] is exactly one step (kt_step.onnx) from the (h, c) after H. Entries are keyed by the digest
of a history prefix, d(t) = blake2b(version, then id NUL correct for each of the first t answers), and hold that
(h, c). A request looks up the longest cached prefix among its last LOOKBACK, steps the remaining answers forward
(or runs kt_state.onnx over the whole history when none is cached) and stores its own. One hash runs over the
history and is copied at the looked-up lengths only: a request that misses pays ~15 us, not one digest an answer.
A history that shrinks or changes in the middle has other digests, so it never hits; the version is every key's
root, so a swap never serves another version's state (and each ActiveModel has its own cache).

Item ids, not vectors, are keyed: an item whose vector is replaced (POST /items on an existing id) clears the
cache once the worker's catalog index sees the change (`invalidate_on`), within index_refresh_s (at once in the
worker that took the POST). Not covered: a request that read the old vector just before the replacement and stores
its state just after the clearing (a window of one request's own duration).

Bounded LRU, one per worker and version, thread-safe (endpoints run in the threadpool). Bytes per entry, H = 128
and 2 layers: 2,048 of float32 memory plus ~300 of key, array header and dict overhead.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

LOOKBACK = 8  # prefixes looked up per request: the client sent up to LOOKBACK - 1 answers since its last request
_CORRECT = (b"\x00\x00", b"\x00\x01")  # NUL, then the answer: ids never hold a NUL, so the stream is unambiguous


class _Continues(Protocol):
    def kt_state(self, history: np.ndarray, history_correct: np.ndarray) -> np.ndarray: ...
    def kt_memory(self, history: np.ndarray, history_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def kt_continue(
        self, memory: np.ndarray, history: np.ndarray, history_correct: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


class KTStateCache:
    """(h, c) of recent histories of one version in one worker; `state` is the cached equivalent of kt_state."""

    def __init__(self, version: str, entries: int) -> None:
        if entries < 1:
            raise ValueError(f"entries must be >= 1, got {entries}")
        self.version = version
        self.entries = entries
        self._root = hashlib.blake2b(b"gramrec-kt-state\x00" + version.encode() + b"\x00", digest_size=16)
        self._memory: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0  # the catalog index's count of replaced vectors when the entries were made
        self.hits = 0  # requests that found a prefix (counters, read without the lock)
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def digests(self, ids: Sequence[str], correct: np.ndarray) -> tuple[int, list[bytes]]:
        """(first, keys): keys[j] is d(first + j) for the prefix lengths a request looks up, max(1, T - LOOKBACK + 1)
        to T (none for T = 0)."""
        first = max(1, len(ids) - LOOKBACK + 1)
        answers = [item_id.encode() + _CORRECT[answer] for item_id, answer in zip(ids, correct.tolist(), strict=True)]
        running = self._root.copy()
        running.update(b"".join(answers[: first - 1]))
        keys = []
        for answer in answers[first - 1 :]:
            running.update(answer)
            keys.append(running.copy().digest())
        return first, keys

    def state(self, model: _Continues, ids: Sequence[str], history: np.ndarray, correct: np.ndarray) -> np.ndarray:
        """The LSTM state [H] after the history (ids [T], vectors [T, D], correct [T] of 0/1), as model.kt_state."""
        correct = np.asarray(correct, np.int64).reshape(-1)
        if len(ids) == 0:
            return model.kt_state(history, correct)  # the learned start state; nothing to cache
        first, keys = self.digests(ids, correct)
        length, memory = self._longest(first, keys)
        if memory is None:
            self.misses += 1
            state, memory = model.kt_memory(history, correct)
        else:
            self.hits += 1
            if length == len(ids):
                return memory[0, -1].copy()  # the top layer's h is the served state
            state, memory = model.kt_continue(memory, history[length:], correct[length:])
        self._put(keys[-1], memory)
        return state

    def invalidate_on(self, generation: int) -> None:
        """Drops every entry when an item's vector was replaced since they were made (a count that only grows)."""
        if generation != self._generation:
            with self._lock:
                self._memory.clear()
                self._generation = generation

    def _longest(self, first: int, keys: list[bytes]) -> tuple[int, np.ndarray | None]:
        """(length, memory) of the longest cached prefix among `keys` (d(first) ...), or (0, None)."""
        with self._lock:
            for j in range(len(keys) - 1, -1, -1):
                memory = self._memory.get(keys[j])
                if memory is not None:
                    self._memory.move_to_end(keys[j])
                    return first + j, memory
        return 0, None

    def _put(self, key: bytes, memory: np.ndarray) -> None:
        with self._lock:
            self._memory[key] = memory
            self._memory.move_to_end(key)
            while len(self._memory) > self.entries:
                self._memory.popitem(last=False)
