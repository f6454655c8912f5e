"""Bounded loopback load test of `kerasft serve`: a fixed number of chat requests at a fixed
concurrency, under a time cap, against 127.0.0.1 only. Prints p50/p95 latency and tokens/s and
writes them as JSON.

    python scripts/bench_serve.py tests-tiny-preset-dir --requests 32 --concurrency 4 --out bench.json
    python scripts/bench_serve.py embedded --requests 16 --concurrency 4 --max-tokens 32
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --requests 16   # a server already running

With a model source the server runs in this process on an ephemeral port. Warm-up requests at
every batch size up to the concurrency run first (they compile the generate programs) and are
reported separately from the measured requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

PROMPTS = [
    "¿Cuál es la capital de España?",
    "Resume en una frase: el río Ebro atraviesa Zaragoza.",
    "What is the capital of France?",
    "Traduce al inglés: el perro duerme en el sofá.",
    "¿Cuántos días tiene una semana?",
    "Name three colours.",
    "¿Quién escribió el Quijote?",
    "Explain in one sentence why the sky is blue.",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="model to serve in-process (run dir, preset dir, HF dir, preset name)")
    parser.add_argument("--url", help="an already running server on 127.0.0.1 instead of SRC")
    parser.add_argument("--requests", type=int, default=32, help="measured requests (fixed)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once (fixed)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-cap", type=float, default=600.0, help="stop sending new requests after this many s")
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--out", default="bench_serve.json", help="JSON results file")
    args = parser.parse_args(argv)
    if bool(args.src) == bool(args.url):
        parser.error("give either SRC or --url")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    server = engine = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error(f"--url must point at this machine (127.0.0.1), not {host}")
        base = args.url.rstrip("/")
    else:
        from kerasft.serve import load_engine, make_server

        started = time.perf_counter()
        engine = load_engine(args.src, max_batch=args.concurrency, batch_window_s=args.batch_window_ms / 1000,
                             max_tokens_limit=args.max_tokens)
        server = make_server(engine, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = "http://127.0.0.1:%d" % server.server_address[1]
        print(f"loaded {args.src} in {time.perf_counter() - started:.1f} s; serving on {base}", flush=True)

    try:
        warmup_started = time.perf_counter()
        if engine is not None:  # compile every batch size the measured run can form
            engine.warm_up([engine.chat({"messages": [{"role": "user", "content": text}]})["prompt_ids"]
                            for text in PROMPTS], args.max_tokens)
        else:  # a remote server: some batch sizes may still compile during the measured run
            size = 1
            while size <= args.concurrency:
                with ThreadPoolExecutor(size) as pool:
                    list(pool.map(lambda i: _chat(base, PROMPTS[i % len(PROMPTS)], args.max_tokens), range(size)))
                size *= 2
        warmup_s = time.perf_counter() - warmup_started
        print(f"warm-up (compiles included): {warmup_s:.1f} s", flush=True)

        deadline = time.perf_counter() + args.time_cap
        results = []

        def one(index):
            if time.perf_counter() > deadline:
                return None
            return _chat(base, PROMPTS[index % len(PROMPTS)], args.max_tokens)

        batches_before = len(engine.stats["batch_sizes"]) if engine else 0
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = [r for r in pool.map(one, range(args.requests)) if r is not None]
        wall = time.perf_counter() - started
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
            engine.close()

    latencies = sorted(r["seconds"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "scripts/bench_serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "source": args.src or args.url,
        "requests_sent": args.requests,
        "requests_done": len(results),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "wall_s": round(wall, 2),
        "warmup_s": round(warmup_s, 1),
        "latency_p50_s": round(_percentile(latencies, 50), 3),
        "latency_p95_s": round(_percentile(latencies, 95), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 2),
        "batch_sizes": _histogram(engine.stats["batch_sizes"][batches_before:]) if engine else None,
    }
    print(f"{len(results)}/{args.requests} requests at concurrency {args.concurrency}, max_tokens {args.max_tokens}: "
          f"p50 {report['latency_p50_s']:.2f} s, p95 {report['latency_p95_s']:.2f} s, "
          f"{report['tokens_per_s']:.1f} tokens/s, {report['requests_per_s']:.2f} requests/s ({wall:.1f} s)")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if len(results) == args.requests else 1


def _chat(base: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return {"seconds": time.perf_counter() - started, "completion_tokens": reply["usage"]["completion_tokens"]}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _histogram(sizes: list[int]) -> dict:
    return {str(size): sizes.count(size) for size in sorted(set(sizes))}


if __name__ == "__main__":
    sys.exit(main())
