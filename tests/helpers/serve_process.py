"""A real `gramrec serve` process for fault and security tests: this checkout's code, loopback only, logs kept.

The server runs `python -m gramrec.trainer.cli serve` from the (editable) install of this checkout, so it imports
the code under test. Its stdout and stderr go to a file, which tests read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90


class ServeProcess:
    def __init__(self, log_path: Path, env: dict[str, str], workers: int = 1):
        self.port = free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        base = {
            "GRAMREC_BOOTSTRAP": "false",
            "GRAMREC_ORT_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.env = os.environ | base | env
        self.process: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> ServeProcess:
        command = [sys.executable, "-m", "gramrec.trainer.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(self.workers)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {timeout_s}s: {self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup; whatever was in flight is cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
