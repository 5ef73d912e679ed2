"""The README's settings tables list exactly the variables the settings classes read, each once."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from gramrec.service.settings import Limits, ServiceSettings
from gramrec.trainer.logs import LogSettings
from gramrec.trainer.retrain.settings import RetrainSettings
from gramrec.trainer.settings import TrainSettings

README = Path(__file__).resolve().parents[1] / "README.md"
VARIABLE = re.compile(r"`((?:GRAMREC_[A-Z0-9_]+)|REDIS_URL)`")


def documented_rows() -> list[str]:
    """Variables named in the first cell of a `| variable | default | |` table row."""
    names = []
    in_table = False
    for line in README.read_text().splitlines():
        if line.startswith("| variable |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        if in_table and not line.startswith("|---"):
            names += VARIABLE.findall(line.split("|")[1])
    return names


def expected() -> set[str]:
    serving = {f"GRAMREC_{name.upper()}" for name in ServiceSettings.model_fields if name not in ("limits", "redis_url")}
    limits = {f"GRAMREC_LIMITS__{name.upper()}" for name in Limits.model_fields}
    retrain = {f"GRAMREC_RETRAIN__{name.upper()}" for name in RetrainSettings.model_fields}
    return serving | limits | retrain | {"REDIS_URL"}


def test_the_tables_are_read():
    rows = documented_rows()
    assert "GRAMREC_ADMIN_TOKEN" in rows and "GRAMREC_RETRAIN__LEASE_TTL_S" in rows and len(rows) > 40


def test_every_setting_is_documented_once_and_nothing_else():
    rows = documented_rows()
    assert not {name for name, n in Counter(rows).items() if n > 1}, "a variable is documented twice"
    assert set(rows) - expected() == set(), "documented, but no settings field reads it"
    assert expected() - set(rows) == set(), "read by a settings field, but not documented"


def test_the_env_prefixes_are_the_documented_ones():
    assert ServiceSettings.model_config["env_prefix"] == "GRAMREC_"
    assert ServiceSettings.model_config["env_nested_delimiter"] == "__"  # GRAMREC_LIMITS__*, GRAMREC_RETRAIN__*
    assert LogSettings.model_config["env_prefix"] == "GRAMREC_" and "log_level" in LogSettings.model_fields
    assert "GRAMREC_LOG_LEVEL" in README.read_text()
    assert TrainSettings.model_config["env_prefix"] == "GRAMREC_TRAIN_" and "GRAMREC_TRAIN_<FLAG>" in README.read_text()


def test_gramrec_train_reads_only_its_own_prefix(monkeypatch):
    """Training and serving share no variable: GRAMREC_LR_CF (no TRAIN_) means nothing to `gramrec train`."""
    monkeypatch.setenv("GRAMREC_TRAIN_LR_CF", "0.5")
    monkeypatch.setenv("GRAMREC_LR_ENCODER", "0.7")
    settings = TrainSettings(task="kt", data=Path("unused"))
    assert settings.lr_cf == 0.5 and settings.lr_encoder == TrainSettings.model_fields["lr_encoder"].default
