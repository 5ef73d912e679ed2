"""Where a served request's CPU goes: `gramrec serve` under py-spy while serve_bench's open loop drives it.

    .venv/bin/python bench/serve_profile.py --scenario "predict kt"
    .venv/bin/python bench/serve_profile.py --scenario "predict nr" --rate 200 --seconds 10

Starts the server on serve_bench's artifacts (training the short models first if there are none) with py-spy
(`pip install py-spy`) sampling it, sends --rate requests/s of one scenario for --seconds, then prints the
functions with the largest share of the server's on-CPU samples: inclusive (the function and what it calls) and
self. Sampling is non-blocking, so it barely slows the server; shares are of samples, not of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench  # noqa: E402

# Leaves of threads that wait (py-spy's idle detection misses some of them with --nonblocking): not counted.
WAITING = ("Condition.wait (", "Queue.get (", "Event.wait (")
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="predict kt", choices=list(serve_bench.SCENARIOS))
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL (Python work)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gramrec-serve-profile.txt"), help="raw py-spy stacks")
    parser.add_argument("--artifacts", type=Path, default=serve_bench.ROOT / "artifacts" / "bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    return parser.parse_args()


def frame_name(frame: str) -> str:
    """'predict (gramrec/service/routers/predict.py:40)' -> 'predict (service/routers/predict.py)'."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/wt15/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarize(raw: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        frames = frames[1:] if frames and frames[0].startswith(("process ", "thread ")) else frames
        if frames and frames[-1].startswith(WAITING):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    lines = [f"{total} samples", "", "| inclusive % | self % | function |", "|---:|---:|---|"]
    for name, n in inclusive.most_common(top):
        lines.append(f"| {100 * n / total:.1f} | {100 * own[name] / total:.1f} | `{name}` |")
    lines += ["", "top self:", "", "| self % | function |", "|---:|---|"]
    for name, n in own.most_common(top):
        lines.append(f"| {100 * n / total:.1f} | `{name}` |")
    return "\n".join(lines)


async def drive(url: str, args: argparse.Namespace) -> dict:
    models = httpx.get(url + "/readyz", timeout=10).json()["models"]
    ids = {task: serve_bench.item_ids(args.artifacts, version) for task, version in models.items()}
    path, make = serve_bench.payloads(ids, serve_bench.random.Random(0))[args.scenario]
    async with serve_bench.RawClient(url) as client:
        return await serve_bench.open_loop(client, path, make, args.rate, args.seconds, serve_bench.ServerCpu(None))


def main() -> None:
    args = parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    bench_args = serve_bench.parse_args([f"--artifacts={args.artifacts}", f"--redis-url={args.redis_url}"])
    serve_bench.ensure_models(bench_args)
    process, url, prefix = serve_bench.start_server(bench_args)
    spy = subprocess.Popen(
        [py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "250", "-o", str(args.out)]
        + ["--pid", str(process.pid)]
        + (["--gil"] if args.gil else []),
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        result = asyncio.run(drive(url, args))
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
        serve_bench.stop_server(process, args.redis_url, prefix)
    print(
        f"{args.scenario}, open loop {args.rate:g} req/s: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    print(summarize(args.out, args.top))


if __name__ == "__main__":
    main()
