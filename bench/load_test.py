"""Server load test: aggregate generated tokens/s with 1, 8 and 32 concurrent streaming clients.

    python -m ternary.bench.load_test ../shared/oracle/tiny-tq2_0-f16.gguf     # starts its own server
    python -m ternary.bench.load_test --url http://127.0.0.1:8080 --clients 1,8,32   # a running one

Each client sends streaming /v1/completions requests back to back (`ignore_eos`, so every request generates
exactly --max-tokens) and records time to first token and total latency. For each concurrency level the bench
prints one table row (aggregate tokens/s = all completion tokens / wall time), then one JSON line at the end.
Only the standard library talks HTTP here, so the figures are the server's, not a client library's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass


@dataclass
class LevelResult:
    clients: int
    requests: int
    errors: int
    completion_tokens: int
    prompt_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    server_cpu_s: float | None  # CPU seconds the server process used (when the bench started it)
    tokens_per_cpu_s: float | None  # completion tokens per server CPU second: less sensitive to a busy box


def stream_completion(base: str, prompt: str, max_tokens: int, timeout: float) -> tuple[float, float, dict]:
    """One streaming request: (seconds to the first text, seconds in all, usage)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first = None
        usage: dict = {}
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
        return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, usage
    finally:
        conn.close()


def run_level(
    base: str, clients: int, per_client: int, max_tokens: int, prompt: str, server_pid: int | None
) -> LevelResult:
    ttfts: list[float] = []
    latencies: list[float] = []
    totals = {"completion": 0, "prompt": 0, "errors": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            try:
                first, total, usage = stream_completion(base, f"{prompt} ({i}.{j})", max_tokens, timeout=600)
            except Exception as e:  # counted, and shown once
                with lock:
                    totals["errors"] += 1
                    if totals["errors"] == 1:
                        print(f"  first error: {e}", file=sys.stderr)
                continue
            with lock:
                ttfts.append(first)
                latencies.append(total)
                totals["completion"] += usage.get("completion_tokens", 0)
                totals["prompt"] += usage.get("prompt_tokens", 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu0 = _cpu_seconds(server_pid)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = None if server_pid is None else round(_cpu_seconds(server_pid) - cpu0, 3)
    return LevelResult(
        clients=clients,
        requests=clients * per_client,
        errors=totals["errors"],
        completion_tokens=totals["completion"],
        prompt_tokens=totals["prompt"],
        wall_s=round(wall, 3),
        tokens_per_s=round(totals["completion"] / wall, 2),
        ttft_p50_ms=round(_percentile(ttfts, 50) * 1e3, 1),
        ttft_p95_ms=round(_percentile(ttfts, 95) * 1e3, 1),
        latency_p50_ms=round(_percentile(latencies, 50) * 1e3, 1),
        latency_p95_ms=round(_percentile(latencies, 95) * 1e3, 1),
        server_cpu_s=cpu,
        tokens_per_cpu_s=round(totals["completion"] / cpu, 2) if cpu else None,
    )


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class OwnServer:
    """`python -m ternary.server` on a free port, for when no --url is given."""

    def __init__(self, model: str, parallel: int, ctx: int, threads: int | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ternary.server", model, "--port", str(self.port), "-np", str(parallel)]
        cmd += ["-c", str(ctx), "--max-queue", "256", "--log-level", "warning"]
        if threads:
            cmd += ["-t", str(threads)]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise SystemExit("the server did not become ready in 600 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="GGUF to serve (omit with --url)")
    p.add_argument("--url", help="measure an already running server instead")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level")
    p.add_argument("-n", "--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--prompt", default="def fibonacci(n):\n    ", help="prompt text")
    p.add_argument("-np", "--parallel", type=int, default=8, help="server slots when starting one")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="server context per slot if started")
    p.add_argument("-t", "--threads", type=int, default=None, help="server compute threads when starting one")
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give a MODEL to serve or --url of a running server")
    levels = [int(c) for c in args.clients.split(",")]

    server = None if args.url else OwnServer(args.model, args.parallel, args.ctx_size, args.threads)
    base = args.url or server.url
    try:
        stream_completion(base, "warm-up", 4, timeout=600)  # JIT and caches, outside the figures
        with urllib.request.urlopen(base + "/props", timeout=30) as r:
            props = json.loads(r.read())
        pid = server.proc.pid if server is not None else None
        results = [run_level(base, c, args.requests, args.max_tokens, args.prompt, pid) for c in levels]
    finally:
        if server is not None:
            server.stop()

    model, slots, load = props.get("model_alias"), props.get("total_slots"), os.getloadavg()[0]
    print(f"\nserver {base}: {model}, {slots} slots, {os.cpu_count()} cpus, load average {load:.1f}")
    columns = ["clients", "requests", "errors", "completion_tokens", "wall_s", "tokens_per_s"]
    columns += ["ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "server_cpu_s", "tokens_per_cpu_s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * len(columns))
    for r in results:
        print("| " + " | ".join(str(getattr(r, c)) for c in columns) + " |")
    summary = {
        "model": model,
        "load_average": round(load, 2),
        "slots": slots,
        "max_tokens": args.max_tokens,
        "levels": [asdict(r) for r in results],
    }
    print(json.dumps(summary))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
