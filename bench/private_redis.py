"""A private redis-server for one benchmark run: INFO's memory and byte counters then count this run alone
(the shared server at 6379 serves other people's tests at the same time)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def private_redis() -> Iterator[str]:
    """Starts redis-server on a free loopback port (no persistence), yields its URL, stops it."""
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(10)


def redis_counters(url: str, stream_key: str) -> dict:
    """used_memory, bytes received so far (total_net_input_bytes), and the stream's length."""
    client = redis.Redis.from_url(url)
    try:
        memory, stats = client.info("memory"), client.info("stats")
        return {
            "used_memory": int(memory["used_memory"]),
            "net_input_bytes": int(stats["total_net_input_bytes"]),
            "stream_length": int(client.xlen(stream_key)),
        }
    finally:
        client.close()
