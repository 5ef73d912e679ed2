"""docker-compose.yml as written: what a compose client's `config` cannot judge (CI runs that too, .ci/compose-config)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gramrec.trainer.retrain.settings import RetrainSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_long_running_service_has_a_healthcheck():
    for name in ("redis", "api", "trainer"):
        check = SERVICES[name]["healthcheck"]
        assert check["test"] and not check.get("disable"), name
    assert SERVICES["trainer"]["healthcheck"]["test"] == ["CMD", "gramrec", "trainer", "--health"]


def test_the_trainer_bootstraps_and_the_api_waits():
    assert SERVICES["trainer"]["environment"]["GRAMREC_BOOTSTRAP"].endswith(":-true}")
    assert SERVICES["trainer"]["environment"]["GRAMREC_BOOTSTRAP_DEVICE"] == "cuda"
    assert SERVICES["api"]["environment"]["GRAMREC_BOOTSTRAP"].endswith(":-false}")


def test_api_scales_out_on_a_port_range():
    (mapping,) = SERVICES["api"]["ports"]
    host, container = mapping.rsplit(":", 1)
    assert container == "8000" and "-" in host.split(":-", 1)[1]  # a range: --scale api=N gets one port each


def test_data_volume_has_a_working_default():
    for name in ("api", "trainer", "train-once"):
        datasets = [v for v in SERVICES[name]["volumes"] if v.endswith(":/data/datasets:ro")]
        assert datasets == ["${GRAMREC_DATASETS:-../shared/data}:/data/datasets:ro"], name
    assert "GRAMREC_DATASETS" in (ROOT / "README.md").read_text()


def test_train_once_checkpoints_are_where_retrains_look():
    out = SERVICES["train-once"]["environment"]["GRAMREC_TRAIN_OUT"]
    runs = [v for v in SERVICES["train-once"]["volumes"] if out.startswith(v.split(":")[1])]
    assert runs and runs[0] in SERVICES["trainer"]["volumes"]


def test_no_unused_onnxruntime_gpu():
    """Exports check ONNX on CPUExecutionProvider only; the CUDA build was installed, unpinned, and never used."""
    commands = [line for line in (ROOT / "docker" / "trainer.Dockerfile").read_text().splitlines()
                if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "onnxruntime" in line]


# The retrain settings issue #14 added (incremental mode, triggers, replay, the interaction log's lifecycle).
ISSUE_14_RETRAIN = {
    "mode", "full_cron", "volume_trigger", "volume_check_s", "replay_ratio", "replay_min", "replay_max",
    "replay_seed", "context_answers", "log_dir", "compact_interval_s", "segment_entries", "stream_retention_s",
}
RETRAIN_PREFIX = "GRAMREC_RETRAIN__"


def compose_default(value: str) -> str | None:
    """`${NAME:-default}` -> default (what the container gets with nothing in .env); `${NAME}` -> None; a literal
    stays itself."""
    match = re.fullmatch(r"\$\{([A-Z0-9_]+)(?::-(.*))?\}", str(value))
    if match is None:
        return str(value)
    return match.group(2)


def trainer_retrain_env() -> dict[str, str]:
    environment = SERVICES["trainer"]["environment"]
    return {name[len(RETRAIN_PREFIX):].lower(): value for name, value in environment.items()
            if name.startswith(RETRAIN_PREFIX)}


def test_the_trainer_gets_every_retrain_setting():
    """A setting compose does not forward cannot be set from .env at all (a variable reaches a container only
    through `environment`); fault drills are for tests, not deployments."""
    passed = trainer_retrain_env()
    assert ISSUE_14_RETRAIN <= set(passed), ISSUE_14_RETRAIN - set(passed)
    assert set(RetrainSettings.model_fields) - set(passed) == {"inject_fault"}
    assert set(passed) <= set(RetrainSettings.model_fields), "a variable no retrain setting reads"
    for name, value in passed.items():  # a variable compose forwards is the one the container sees, by name
        if value.startswith("${"):
            assert value.startswith(f"${{{RETRAIN_PREFIX}{name.upper()}"), name


def test_compose_defaults_are_the_settings_defaults():
    """With nothing in .env the trainer runs with the documented defaults (compose writes unset as '')."""
    passed = {name: compose_default(value) for name, value in trainer_retrain_env().items()}
    forwarded = {name: value for name, value in passed.items() if trainer_retrain_env()[name].startswith("${")}
    assert {"volume_trigger", "time_budget_s", "mode", "stream_retention_s"} <= set(forwarded)
    parsed = RetrainSettings(**forwarded)
    defaults = RetrainSettings()
    for name in forwarded:
        assert getattr(parsed, name) == getattr(defaults, name), name


def test_the_interaction_log_is_on_a_volume_of_its_own():
    """Its segments are the only copy of trimmed interactions: not inside a container's writable layer."""
    log_dir = trainer_retrain_env()["log_dir"]
    mounts = [v for v in SERVICES["trainer"]["volumes"] if v.split(":")[1] == log_dir]
    assert len(mounts) == 1
    volume = mounts[0].split(":")[0]
    assert volume in COMPOSE["volumes"] and volume not in ("artifacts", "runs")
    RetrainSettings(log_dir=log_dir)  # a valid value of the setting
