"""Latency and throughput of the HTTP API: /predict (kt, nr) and POST /items, closed loop and open loop.

    .venv/bin/python bench/serve_bench.py                      # starts `gramrec serve` itself, Redis on loopback
    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000 --artifacts artifacts/bench

Without --url it serves the versions in --artifacts, first training and exporting a short all-MiniLM-L6-v2 model
per task (GRAM, period 1e, --train-steps steps) if the folder has none. Requests:
  predict kt: 100 answers of history, 5 targets; predict nr: 50 clicks, 20 candidates;
  predict kt session: --session-students students, each request one more answer to its student's history (from
  100 answers on, round-robin over the students), 5 targets, as a tutoring app resends a growing history (the
  server's per-student state cache then runs one LSTM step per request; each student's first request misses);
  POST /items: one new item per request, a text of about 32 tokens.
  recommend kt: 100 answers, next 10 questions (target 0.7); recommend nr: 50 clicks, top 10 of the whole catalog.
--synthetic-catalog N serves copies of the models whose catalogs are grown to N items by random unit vectors
(recommend over 10k or 51k items).
Closed loop at each --concurrency (that many clients back to back, each request timed from send to answer), then
an open loop at a fixed --rate (requests sent on a schedule; latency counted from the scheduled send time, so
queueing is included). Every run is bounded by a request count and a time limit. Prints a markdown table and
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "student loop array string method return value recursion market team weather report city policy "
    "election science health music film travel season score player coach result"
).split()


SCENARIOS = ("predict kt", "predict kt session", "predict nr", "POST /items", "recommend kt", "recommend nr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the started server")
    parser.add_argument("--ort-threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the short training, if needed")
    parser.add_argument("--codeworkout", type=Path, default=ROOT.parent / "shared" / "data" / "codeworkout_s19")
    parser.add_argument("--mind", type=Path, default=ROOT.parent / "shared" / "data" / "mind_small_subset")
    parser.add_argument("--nr-impressions", type=int, default=150, help="MIND impressions the nr model trains on")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["predict kt", "predict nr", "POST /items"],
        choices=SCENARIOS,
    )
    parser.add_argument(
        "--synthetic-catalog",
        type=int,
        default=0,
        help="serve copies of the models whose catalogs are grown to this many items with random unit vectors",
    )
    parser.add_argument(
        "--synthetic-tasks",
        nargs="+",
        choices=["kt", "nr"],
        default=["kt", "nr"],
        help="the tasks whose catalogs --synthetic-catalog grows (the others are served as trained)",
    )
    parser.add_argument(
        "--server-cpus",
        type=int,
        nargs="*",
        help="pin the started server to these CPU numbers and the client to the others (default: no pinning)",
    )
    parser.add_argument("--session-students", type=int, default=100, help="students of 'predict kt session'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=600, help="per closed-loop run (after warm-up)")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--run-limit-s", type=float, default=20.0, help="time limit of one closed-loop run")
    parser.add_argument(
        "--client",
        choices=["httpx", "raw"],
        default="httpx",
        help="raw: a minimal keep-alive HTTP/1.1 client, to leave the server more of a small machine",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "serve_bench.json")
    return parser.parse_args(argv)


# -- server ------------------------------------------------------------------------------------------------------
def mind_sample(source: Path, target: Path, impressions: int) -> Path:
    """A random sample of MIND impressions (all days) and only the news they mention, in MIND's layout.

    MIND makes every news of news.tsv an item (51k), which CPU training encodes several times; serving cost does
    not depend on the catalog size (one HMGET per request), so the bench trains on a few thousand news.
    """
    if (target / "behaviors.tsv").is_file():
        return target
    lines = [line for line in (source / "behaviors.tsv").read_text().split("\n") if line.strip()]
    sample = random.Random(0).sample(lines, impressions)
    wanted = set()
    for line in sample:
        fields = line.split("\t")
        wanted.update(fields[3].split())
        wanted.update(token.rsplit("-", 1)[0] for token in fields[4].split())
    news = [line for line in (source / "news.tsv").read_text().split("\n") if line.split("\t", 1)[0] in wanted]
    target.mkdir(parents=True, exist_ok=True)
    (target / "news.tsv").write_text("\n".join(news) + "\n")
    (target / "behaviors.tsv").write_text("\n".join(sample) + "\n")
    return target


def ensure_models(args: argparse.Namespace) -> None:
    from gramrec.service.artifact import list_versions
    from gramrec.service.settings import ServiceSettings
    from gramrec.trainer.bootstrap import train_and_export
    from gramrec.trainer.logs import configure_logging

    configure_logging()  # quiet Hugging Face load reports
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    have = {m["task"] for m in list_versions(args.artifacts)}
    nr_data = mind_sample(args.mind, args.artifacts / "data" / "mind_sample", args.nr_impressions)
    for task in ("kt", "nr"):
        if task not in have:
            print(
                f"training a short {task} model ({args.train_steps} steps) into {args.artifacts} ...", file=sys.stderr
            )
            settings = ServiceSettings(
                artifacts_dir=args.artifacts,
                bootstrap_max_steps_per_epoch=args.train_steps,
                bootstrap_kt_data=args.codeworkout,
                bootstrap_nr_data=nr_data,
            )
            train_and_export(settings, task)


def synthetic_artifacts(artifacts: Path, items: int, tasks: list[str]) -> Path:
    """Copies of each task's newest version whose item table (for `tasks`) is grown to `items` with random unit
    vectors.

    The model's own items stay first and unchanged, so the golden check still passes; the copies live in their own
    artifacts root (`<artifacts>/synthetic-<items>-<tasks>`), made once.
    """
    from safetensors.numpy import load, save

    from gramrec.service.artifact import list_versions, write_manifest

    root = artifacts / f"synthetic-{items}-{'-'.join(sorted(tasks))}"
    newest: dict[str, str] = {}
    for manifest in list_versions(artifacts):
        newest.setdefault(manifest["task"], manifest["version"])
    rng = np.random.default_rng(0)
    for task, version in newest.items():
        target = root / version
        if target.is_dir():
            continue
        shutil.copytree(artifacts / version, target)
        index = json.loads((target / "items.json").read_text())
        table = load((target / "items.safetensors").read_bytes())["embeddings"]
        extra = max(0, items - len(index["ids"])) if task in tasks else 0
        vectors = rng.standard_normal((extra, table.shape[1]), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index["ids"] += [f"syn-{i}" for i in range(extra)]
        index["texts"] = index.get("texts", []) + [""] * extra if index.get("texts") else []
        if index.get("metadata") is not None:
            index["metadata"] += [{}] * extra
        (target / "items.json").write_text(json.dumps(index))
        (target / "items.safetensors").write_bytes(save({"embeddings": np.concatenate([table, vectors])}))
        manifest = json.loads((target / "manifest.json").read_text())
        manifest.pop("files")
        manifest["items"]["count"] = len(index["ids"])
        write_manifest(target, manifest)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    port, prefix = free_port(), f"gramrec-bench-{uuid.uuid4().hex[:8]}:"
    env = os.environ | {
        "REDIS_URL": args.redis_url,
        "GRAMREC_REDIS_KEY_PREFIX": prefix,
        "GRAMREC_ARTIFACTS_DIR": str(args.artifacts),
        "GRAMREC_BOOTSTRAP": "false",
        "GRAMREC_ORT_THREADS": str(args.ort_threads),
    }
    command = [
        sys.executable,
        "-m",
        "gramrec.trainer.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
    ]
    server_cpus = set(args.server_cpus or [])
    if server_cpus:  # the server on these cores, this client on the others
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - server_cpus or server_cpus)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a large synthetic catalog is loaded into the store and indexed before the server is ready
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url, prefix
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise SystemExit("server not ready within 900 s")


def stop_server(process: subprocess.Popen, redis_url: str, prefix: str) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


# -- requests -----------------------------------------------------------------------------------------------------
def item_ids(artifacts: Path, version: str) -> list[str]:
    return json.loads((artifacts / version / "items.json").read_text())["ids"]


def payloads(ids: dict[str, list[str]], rng: random.Random, students: int = 100):
    def answer() -> dict:
        return {"item_id": rng.choice(ids["kt"]), "correct": rng.random() < 0.6}

    def kt() -> dict:
        return {"task": "kt", "history": [answer() for _ in range(100)], "targets": rng.sample(ids["kt"], 5)}

    histories = [[answer() for _ in range(99)] for _ in range(students)]
    turns = itertools.cycle(histories)

    def kt_session() -> dict:
        history = next(turns)
        history.append(answer())
        return {"task": "kt", "history": list(history), "targets": rng.sample(ids["kt"], 5)}

    def nr() -> dict:
        chosen = rng.sample(ids["nr"], 70)
        return {"task": "nr", "history": chosen[:50], "candidates": chosen[50:]}

    counter = iter(range(10**9))

    def item() -> dict:
        text = " ".join(rng.choice(WORDS) for _ in range(28))  # about 32 tokens with [CLS], [SEP] and word pieces
        return {"task": "nr", "items": [{"item_id": f"bench-{uuid.uuid4().hex[:8]}-{next(counter)}", "text": text}]}

    def recommend_kt() -> dict:
        history = [{"item_id": rng.choice(ids["kt"]), "correct": rng.random() < 0.6} for _ in range(100)]
        return {"task": "kt", "history": history, "k": 10, "target": 0.7}

    def recommend_nr() -> dict:
        return {"task": "nr", "history": rng.sample(ids["nr"], 50), "k": 10}

    return {
        "predict kt": ("/predict", kt),
        "predict kt session": ("/predict", kt_session),
        "predict nr": ("/predict", nr),
        "POST /items": ("/items", item),
        "recommend kt": ("/recommend", recommend_kt),
        "recommend nr": ("/recommend", recommend_nr),
    }


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for JSON POSTs only.

    It spends a fraction of httpx's CPU per request, so on a machine of two cores shared by client and server
    the latencies show the server more than the client.
    """

    def __init__(self, url: str):
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, content: bytes, headers: dict | None = None) -> SimpleNamespace:
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self.host.encode(), len(content))
            + content
        )
        while self.idle:  # a kept-alive connection; the server may have closed it while idle: then the next
            connection = self.idle.pop()
            try:
                return await self._exchange(connection, request)
            except (asyncio.IncompleteReadError, ConnectionError):
                connection[1].close()
        return await self._exchange(await asyncio.open_connection(self.host, self.port), request)

    async def _exchange(self, connection, request: bytes) -> SimpleNamespace:
        reader, writer = connection
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        start = head.lower().index(b"content-length:") + len(b"content-length:")
        await reader.readexactly(int(head[start : head.index(b"\r\n", start)]))
        self.idle.append(connection)
        return SimpleNamespace(status_code=int(head[9:12]))

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc) -> None:
        for _, writer in self.idle:
            writer.close()


async def timed_post(client: httpx.AsyncClient, path: str, body: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    return time.perf_counter() - start, response.status_code


async def closed_loop(client, path, make, concurrency: int, total: int, limit_s: float, cpu: ServerCpu) -> dict:
    bodies = [json.dumps(make()).encode() for _ in range(total + 20 * concurrency)]
    for body in bodies[: 20 * concurrency]:  # warm-up, not measured
        await timed_post(client, path, body)
    queue = iter(bodies[20 * concurrency :])
    latencies, errors = [], 0
    deadline = time.perf_counter() + limit_s

    async def worker() -> None:
        nonlocal errors
        for body in queue:
            if time.perf_counter() > deadline:
                return
            seconds, status = await timed_post(client, path, body)
            latencies.append(seconds)
            errors += status != 200

    start, cpu_start = time.perf_counter(), (cpu.seconds(), time.process_time())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(latencies, errors, time.perf_counter() - start) | cpu_per_request(cpu, cpu_start, len(latencies))


async def open_loop(client, path, make, rate: float, seconds: float, cpu: ServerCpu) -> dict:
    n = int(rate * seconds)
    bodies = [json.dumps(make()).encode() for _ in range(n + 50)]
    for body in bodies[:50]:
        await timed_post(client, path, body)
    latencies, from_send, errors = [], [], 0

    async def one(body: bytes, scheduled: float) -> None:
        nonlocal errors
        sent = time.perf_counter()
        response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
        done = time.perf_counter()
        latencies.append(done - scheduled)  # from the scheduled send: includes any backlog (and timer lag)
        from_send.append(done - sent)
        errors += response.status_code != 200

    start, cpu_start = time.perf_counter(), (cpu.seconds(), time.process_time())
    tasks = []
    for i, body in enumerate(bodies[50:]):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
    result = summary(latencies, errors, time.perf_counter() - start) | cpu_per_request(cpu, cpu_start, len(latencies))
    sent_ms = np.array(from_send) * 1000
    return result | {
        "target_rps": rate,
        "p50_ms_from_send": round(float(np.percentile(sent_ms, 50)), 2),
        "p99_ms_from_send": round(float(np.percentile(sent_ms, 99)), 2),
    }


def cpu_per_request(cpu: ServerCpu, start: tuple[float | None, float], requests: int) -> dict:
    server_start, client_start = start
    end = cpu.seconds()
    if not requests:
        return {}
    result = {"client_cpu_ms_per_request": round((time.process_time() - client_start) / requests * 1000, 2)}
    if server_start is not None and end is not None:
        result["server_cpu_ms_per_request"] = round((end - server_start) / requests * 1000, 2)
    return result


class ServerCpu:
    """CPU seconds used by the server process tree (Linux /proc), to report CPU per request: unlike latency,
    it hardly depends on what else the machine is running."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float | None:
        if self.pid is None:
            return None
        total, pids = 0, {self.pid}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat.parent.name) in pids or int(fields[1]) in pids:  # the server or one of its workers
                total += int(fields[11]) + int(fields[12])
        return total / self.ticks


def summary(latencies: list[float], errors: int, wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


async def run(args: argparse.Namespace, url: str, server_pid: int | None) -> dict:
    cpu = ServerCpu(server_pid)
    models = httpx.get(url + "/readyz", timeout=10).json()["models"]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    client_context = (
        RawClient(url) if args.client == "raw" else httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
    )
    async with client_context as client:
        ids = {task: item_ids(args.artifacts, version) for task, version in models.items()}
        scenarios = payloads(ids, random.Random(0), args.session_students)
        results = []
        for name in args.scenarios:
            path, make = scenarios[name]
            for concurrency in args.concurrency:
                result = await closed_loop(client, path, make, concurrency, args.requests, args.run_limit_s, cpu)
                results.append({"scenario": name, "mode": f"closed, concurrency {concurrency}"} | result)
                print(
                    f"  {name:12s} c={concurrency:<3d} p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                    f"{result['throughput_rps']:7.1f} req/s",
                    file=sys.stderr,
                )
        for name in [s for s in args.scenarios if s.startswith(("predict", "recommend"))]:
            path, make = scenarios[name]
            result = await open_loop(client, path, make, args.rate, args.open_seconds, cpu)
            results.append({"scenario": name, "mode": f"open loop, {args.rate:g} req/s"} | result)
            print(
                f"  {name:12s} open  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                f"(from actual send: p50 {result['p50_ms_from_send']:.2f}, p99 {result['p99_ms_from_send']:.2f})",
                file=sys.stderr,
            )
    return {"models": models, "results": results}


def markdown(report: dict) -> str:
    lines = [
        "| scenario | mode | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/req "
        "| client CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['scenario']} | {r['mode']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | "
            f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | "
            f"{r.get('server_cpu_ms_per_request', '-')} | {r.get('client_cpu_ms_per_request', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    process = None
    if args.url:
        url = args.url
    else:
        ensure_models(args)
        if args.synthetic_catalog:
            args.artifacts = synthetic_artifacts(args.artifacts, args.synthetic_catalog, args.synthetic_tasks)
        process, url, prefix = start_server(args)
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        report = asyncio.run(run(args, url, process.pid if process else None))
    finally:
        if process is not None:
            stop_server(process, args.redis_url, prefix)
    report |= {
        "machine": machine() | {"load_average_before": load_before},
        "client": (
            f"httpx {httpx.__version__} AsyncClient" if args.client == "httpx" else "raw asyncio HTTP/1.1 client"
        )
        + ", one process, keep-alive connections, same machine",
        "server": {
            "url": args.url or "started by the bench",
            "workers": args.workers,
            "ort_threads": args.ort_threads,
            "store": "Redis on loopback" if not args.url else "as configured",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(
        f"\nmodels: {report['models']}; machine: {report['machine']['cpu']} x{report['machine']['cores']}; "
        f"client: {report['client']}; JSON: {args.out}"
    )


if __name__ == "__main__":
    main()
