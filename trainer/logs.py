"""Structured (JSON-lines) logging, quiet by default: nothing per request or per step. `gramrec serve` and
`gramrec trainer` log at info (where the server listens, first-start progress every 10 s, model activations,
retrains); the other commands warnings only, unless -v or GRAMREC_LOG_LEVEL asks."""

from __future__ import annotations

import json
import logging
import sys
import time

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _RESERVED}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LogSettings(BaseSettings):
    """Logging of every gramrec process (GRAMREC_LOG_LEVEL); -v on the command line means INFO."""

    model_config = SettingsConfigDict(env_prefix="GRAMREC_", extra="ignore")

    log_level: str | None = Field(
        None,
        description="DEBUG, INFO, WARNING or ERROR; logs are JSON lines on stderr. Unset: INFO for serve and "
        "trainer, WARNING for the other commands",
    )


def configure_logging(level: str | int | None = None, default: str = "WARNING") -> None:
    level = level or LogSettings().log_level or default
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("gramrec")
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.propagate = False
    # Hugging Face prints load reports and progress bars on every model load; keep them out of our logs.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
