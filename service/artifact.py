"""The artifact format: what an exported model version directory holds, and how it is written and verified.

One module for both sides: `trainer.export` writes a version with `write_manifest` (the manifest lists every
other file with its size and sha256), and `service.bundle` reads one with `resolve_version_dir`, `read_manifest`
and `verified_files` before building anything from it. A version directory is written once and never modified:

An artifact version directory is written once by `trainer.export` and never modified afterwards:
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path, PurePosixPath

from gramrec.service.errors import GramrecError
from gramrec.service.settings import VERSION_PATTERN

log = logging.getLogger("gramrec.bundle")

FORMAT = "gramrec-artifact/1"
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "head.onnx"
TOKENIZER_DIR = "tokenizer"
ITEMS_EMBEDDINGS_FILE = "items.safetensors"
ITEMS_INDEX_FILE = "items.json"
# kt only: the head split for catalog-wide scoring (POST /recommend): the LSTM state after a history, and the
# output layer's student and question parts (models/knowledge_tracing_head.py, output_parts).
KT_STATE_FILE = "kt_state.onnx"
KT_OUTPUT_FILE = "kt_output.safetensors"
# kt only, named by kt_parts' "step" (versions without it serve without the per-student state cache): the LSTM
# continued over new answers from the (h, c) that kt_state.onnx also outputs (service/kt_cache.py).
KT_STEP_FILE = "kt_step.onnx"
# kt only, named by the manifest's "kt_calibration": Platt scaling of the head's logit, fitted on validation at
# export (service/kt_scoring.py, KTCalibration). Versions without it serve the head's own sigmoid.
KT_CALIBRATION_FILE = "kt_calibration.json"
_VERSION = re.compile(VERSION_PATTERN)


class ArtifactError(GramrecError):
    """An artifact version is missing, malformed, tampered with, or cannot serve the request asked of it."""

    def __init__(self, where: str | Path, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


def is_valid_version(version: str) -> bool:
    """`<task>-<name>` with a short safe name: never a path separator, never '..', never absolute."""
    return isinstance(version, str) and bool(_VERSION.fullmatch(version)) and ".." not in version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_version_dir(artifacts_root: Path, version: str) -> Path:
    """The version's directory, resolved; refuses anything that is not a directory directly inside the root."""
    if not is_valid_version(version):
        raise ArtifactError(version, f"invalid version name (must match {VERSION_PATTERN} without '..')")
    root = Path(artifacts_root).resolve()
    directory = (root / version).resolve()  # follows symlinks, so a link pointing outside is caught below
    if directory.parent != root or directory.name != version:  # a symlink out of the root, or to another version
        raise ArtifactError(root / version, f"resolves to {directory}, not a version directory of {root}")
    if not directory.is_dir():
        raise ArtifactError(directory, "no such artifact version")
    return directory


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(path, "missing (or not a regular file)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(path, f"invalid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(path, f"format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != directory.name:
        raise ArtifactError(path, f"names version {manifest.get('version')!r}, but lies in {directory.name!r}")
    for key, kind in (("task", str), ("strategy", str), ("dim", int), ("max_tokens", int), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(path, f"field {key!r} missing or not a {kind.__name__}")
    if manifest["task"] not in ("kt", "nr"):
        raise ArtifactError(path, f"unknown task {manifest['task']!r}")
    return manifest


def listed_path(directory: Path, name: str) -> Path:
    """A file named in the manifest, refusing names that could reach outside the version directory."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\\" in name:
        raise ArtifactError(directory / MANIFEST, f"lists an unsafe file name {name!r}")
    path = directory.joinpath(*relative.parts)
    if path.is_symlink() or not path.resolve().is_relative_to(directory):
        raise ArtifactError(path, "is a symlink or lies outside the version directory")
    return path


def verified_files(directory: Path, manifest: dict) -> dict[str, bytes]:
    """Reads every listed file once and checks its size and sha256; returns the bytes that were checked.

    Serving then loads exactly these bytes, so a file swapped after the check can never be served. Files on
    disk that the manifest does not list are refused too: a version directory is immutable.
    """
    contents: dict[str, bytes] = {}
    for name, entry in manifest["files"].items():
        path = listed_path(directory, name)
        if not path.is_file():
            raise ArtifactError(path, "listed in manifest.json but missing")
        data = path.read_bytes()
        if not isinstance(entry, dict) or len(data) != entry.get("bytes") or sha256_bytes(data) != entry.get("sha256"):
            raise ArtifactError(path, "checksum mismatch with manifest.json (corrupted or tampered with)")
        contents[name] = data
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()} - {MANIFEST}
    unlisted = sorted(on_disk - contents.keys())
    if unlisted:
        raise ArtifactError(directory, f"files not listed in manifest.json: {unlisted[:5]}")
    return contents


def list_versions(artifacts_root: Path) -> list[dict]:
    """Manifests of the well-formed version directories under the root, newest first.

    Only the manifests are read here (cheap); `ModelBundle.load` verifies every file's checksum.
    Temporary export directories (".<version>...") and anything else invalid are skipped.
    """
    root = Path(artifacts_root)
    if not root.is_dir():
        return []
    manifests = []
    for child in root.iterdir():
        if not is_valid_version(child.name):
            continue
        try:
            manifests.append(read_manifest(resolve_version_dir(root, child.name)))
        except ArtifactError as exc:
            log.warning("skipping invalid artifact version", extra={"path": exc.where, "problem": exc.problem})
    return sorted(manifests, key=lambda m: (str(m.get("created", "")), m["version"]), reverse=True)


def file_checksums(directory: Path) -> dict[str, dict]:
    """{name: {sha256, bytes}} of every file under the directory but the manifest (what `verified_files` checks)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST:
            data = path.read_bytes()
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return files


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Completes the manifest with the format tag and every file's checksum, and writes it; returns it."""
    manifest = {"format": FORMAT} | manifest | {"files": file_checksums(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    return manifest
