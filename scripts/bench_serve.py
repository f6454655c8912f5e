"""Bounded loopback load test of `kerasft serve`: a fixed number of chat requests from a fixed
number of concurrent clients, every other one streamed, under a time cap, against 127.0.0.1 only.
Prints and writes (JSON) p50/p95 time to first token, p50/p95 latency and tokens/s, and fails
(exit 1) unless every request got its complete answer.

    python scripts/bench_serve.py embedded --requests 32 --concurrency 8 --max-tokens 64
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --requests 32 --concurrency 8 --max-tokens 64

With a model source the server runs in this process on an ephemeral port; with --url the server
is any OpenAI-style one already running on this machine (an older kerasft, for a comparison).

Time to first token is measured on the streamed requests: from sending the request to the first
event that carries answer text (a role-only first chunk does not count). A plain JSON request's
first token arrives with its last, so its TTFT is its latency. A request is complete when it got
a finish_reason, and for a stream also `data: [DONE]`. Warm-up requests (batch sizes 1, 2, 4, ...
up to the concurrency, both kinds) compile the programs first and are reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once (fixed)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-cap", type=float, default=900.0, help="stop sending new requests after this many s")
    parser.add_argument("--api-key", default="", help="sent as a Bearer token")
    parser.add_argument("--out", default="bench_serve.json", help="JSON results file")
    args = parser.parse_args(argv)
    if bool(args.src) == bool(args.url):
        parser.error("give either SRC or --url")
    if not 1 <= args.concurrency <= 64 or not 1 <= args.requests <= 10_000:
        parser.error("--concurrency must be 1..64 and --requests 1..10000")

    server = engine = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error(f"--url must point at this machine (127.0.0.1), not {host}")
        base = args.url.rstrip("/")
    else:
        from kerasft.serve import load_engine, start_server

        started = time.perf_counter()
        engine = load_engine(args.src, max_batch=args.concurrency, max_tokens_limit=args.max_tokens)
        server, base = start_server(engine, "127.0.0.1", 0, api_key=args.api_key or None)
        print(f"loaded {args.src} in {time.perf_counter() - started:.1f} s; serving on {base}", flush=True)

    def ask(index: int) -> dict:
        return _chat(base, PROMPTS[index % len(PROMPTS)], args.max_tokens, stream=index % 2 == 1, key=args.api_key)

    try:
        warmup_started = time.perf_counter()
        size = 1
        while size <= args.concurrency:
            with ThreadPoolExecutor(size) as pool:
                list(pool.map(ask, range(max(size, 2))))
            size *= 2
        warmup_s = time.perf_counter() - warmup_started
        print(f"warm-up (compiles included): {warmup_s:.1f} s", flush=True)

        deadline = time.perf_counter() + args.time_cap

        def one(index):
            return ask(index) if time.perf_counter() < deadline else None

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = [r for r in pool.map(one, range(args.requests)) if r is not None]
        wall = time.perf_counter() - started
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
            engine.close()

    complete = [r for r in results if r["complete"]]
    latencies = sorted(r["seconds"] for r in results)
    ttft_stream = sorted(r["ttft"] for r in results if r["stream"] and r["ttft"] is not None)
    ttft_all = sorted(r["ttft"] if r["ttft"] is not None else r["seconds"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "scripts/bench_serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "source": args.src or args.url,
        "requests_sent": args.requests,
        "requests_done": len(results),
        "requests_complete": len(complete),
        "streamed": sum(r["stream"] for r in results),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "wall_s": round(wall, 2),
        "warmup_s": round(warmup_s, 1),
        "ttft_p50_s": round(_percentile(ttft_stream, 50), 3),
        "ttft_p95_s": round(_percentile(ttft_stream, 95), 3),
        "ttft_all_p50_s": round(_percentile(ttft_all, 50), 3),
        "latency_p50_s": round(_percentile(latencies, 50), 3),
        "latency_p95_s": round(_percentile(latencies, 95), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "rows_per_step": _histogram(engine.stats["batch_sizes"]) if engine else None,
        "answers": {PROMPTS[i]: r["text"] for i, r in enumerate(results[: len(PROMPTS)])},
    }
    print(f"{len(complete)}/{args.requests} complete at concurrency {args.concurrency}, max_tokens {args.max_tokens}: "
          f"TTFT p50 {report['ttft_p50_s']:.2f} s p95 {report['ttft_p95_s']:.2f} s (streamed); latency p50 "
          f"{report['latency_p50_s']:.2f} s p95 {report['latency_p95_s']:.2f} s; {report['tokens_per_s']:.2f} tokens/s "
          f"({wall:.1f} s)")
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0 if len(complete) == args.requests else 1


def _chat(base: str, prompt: str, max_tokens: int, stream: bool, key: str = "") -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    started = time.perf_counter()
    result = {"stream": stream, "ttft": None, "complete": False, "completion_tokens": 0, "text": ""}
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            if not stream:
                reply = json.loads(response.read())
                choice = reply["choices"][0]
                result.update(text=choice["message"]["content"], completion_tokens=reply["usage"]["completion_tokens"],
                              complete=choice["finish_reason"] in ("stop", "length"))
            else:
                finished = done = False
                for line in response:  # server-sent events, one per line as they arrive
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece and result["ttft"] is None:
                            result["ttft"] = time.perf_counter() - started
                        result["text"] += piece or ""
                        finished = finished or choice.get("finish_reason") in ("stop", "length")
                    if event.get("usage"):
                        result["completion_tokens"] = event["usage"]["completion_tokens"]
                result["complete"] = finished and done
    except (OSError, ValueError, KeyError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = time.perf_counter() - started
    return result


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
