"""The CLI prints a domain error as one line, `gramrec: error: ...`, with exit code 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gramrec.service.artifact import ArtifactError
from gramrec.service.errors import GramrecError
from gramrec.trainer import cli


def test_every_domain_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    """ArtifactError is neither a ValueError nor an OSError: only the domain root catches it."""
    assert not issubclass(ArtifactError, (ValueError, OSError)) and issubclass(ArtifactError, GramrecError)

    def export(*args, **kwargs):
        raise ArtifactError("artifacts/kt-1", "checksum mismatch with manifest.json")

    monkeypatch.setattr("gramrec.trainer.export.export_checkpoint", export)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "runs/kt/best", "--out", "artifacts"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "gramrec: error: artifacts/kt-1: checksum mismatch with manifest.json\n"


def test_a_missing_checkpoint_from_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gramrec.trainer.cli", "export", str(tmp_path / "nothing"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gramrec: error: ") and "Traceback" not in result.stderr
    assert str(tmp_path / "nothing") in result.stderr


def test_help_runs_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gramrec.trainer.cli", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout and "serve" in result.stdout
