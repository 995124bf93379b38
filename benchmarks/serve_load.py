"""Load generator for `moetier serve` (or any OpenAI-compatible server): Poisson arrivals at each
request rate, token-id prompts of a set length, a fixed output length (ignore_eos), streaming.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rates 1,2,4,8,inf \\
        --num-requests 128 --prompt-len 512 --output-len 128 --output results.json

Prints one JSON document: the run's configuration and, per rate, request and output-token
throughput, TTFT / TPOT / inter-token latency / end-to-end latency (mean, p50, p99, ms), and how
many requests were rejected (429) or failed. A rate of `inf` sends every request at once
(saturation). TTFT is request sent -> first streamed token; TPOT is (last token - first token) /
(output tokens - 1) per request; output tokens are the server's usage counts.
Needs only httpx and numpy.
"""

import argparse
import asyncio
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class Result:
    status: int = 0
    error: str = ""
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with output
    end: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and bool(self.token_times)


def _stats(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values_s) * 1e3
    return {"mean": round(float(ms.mean()), 3), "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3)}


async def _one(client: httpx.AsyncClient, body: dict) -> Result:
    result = Result(start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = (await resp.aread()).decode(errors="replace")[:200]
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error")
                    break
                if event.get("choices"):
                    result.token_times.append(time.perf_counter())
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    if not result.output_tokens:  # a server without usage in streams: one chunk per token
        result.output_tokens = len(result.token_times)
    return result


def _arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each request is sent: Poisson process, or all at once."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def _body(args, model: str, prompt: list[int]) -> dict:
    return {
        "model": model, "prompt": prompt, "max_tokens": args.output_len, "min_tokens": args.output_len,
        "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }


async def run_rate(args, model: str, vocab: int, rate: float) -> dict:
    n = args.num_requests
    if args.duration and not math.isinf(rate):
        n = max(1, min(n, math.ceil(rate * args.duration)))
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(args.min_token_id, vocab, size=(n, args.prompt_len)).tolist()
    arrivals = _arrivals(rate, n, rng)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def send_at(delay: float, prompt: list[int]) -> Result:
            await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
            return await _one(client, _body(args, model, prompt))

        results = await asyncio.gather(*[send_at(float(a), p) for a, p in zip(arrivals, prompts)])
    ok = [r for r in results if r.ok]
    begin = min(r.start for r in results)
    end = max((r.end for r in ok), default=begin)
    duration = max(end - begin, 1e-9)
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    report = {
        "rate": "inf" if math.isinf(rate) else rate,
        "offered_rate": "inf" if math.isinf(rate) or n < 2 else round((n - 1) / float(arrivals[-1] - arrivals[0]), 3),
        "num_requests": n,
        "completed": len(ok),
        "rejected_429": sum(r.status == 429 for r in results),
        "failed": sum(not r.ok and r.status != 429 for r in results),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(output_tokens / duration, 2),
        "total_token_throughput": round((output_tokens + sum(r.prompt_tokens for r in ok)) / duration, 2),
        "mean_output_tokens": round(output_tokens / len(ok), 2) if ok else 0,
        "ttft_ms": _stats([r.token_times[0] - r.start for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats(itl),
        "e2e_latency_ms": _stats([r.end - r.start for r in ok]),
    }
    errors = sorted({r.error for r in results if r.error})
    if errors:
        report["errors"] = errors[:5]
    return report


async def _server_info(args) -> tuple[str, int, dict]:
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
    return args.model or card["id"], args.vocab_size or card.get("vocab_size") or 32000, card


async def _warmup(args, model: str, vocab: int) -> None:
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(args.timeout)) as client:
        for i in range(args.warmup):
            body = _body(args, model, [args.min_token_id + (i % 7)] * args.prompt_len)
            body["max_tokens"] = body["min_tokens"] = min(args.output_len, 16)
            result = await _one(client, body)
            if not result.ok:
                raise SystemExit(f"warmup request failed: {result.status} {result.error}")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


async def main_async(args) -> dict:
    rates = [float(r) for r in args.rates.split(",") if r]
    model, vocab, card = await _server_info(args)
    await _warmup(args, model, vocab)
    results = []
    for rate in rates:
        report = await run_rate(args, model, vocab, rate)
        print(json.dumps(report), file=sys.stderr, flush=True)
        results.append(report)
    return {
        "benchmark": "serve_load",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "commit": _git_commit(),
        "client_host": platform.node(),
        "server": card,
        "config": {"prompt_len": args.prompt_len, "output_len": args.output_len, "num_requests": args.num_requests,
                   "duration": args.duration, "seed": args.seed, "arrivals": "poisson"},
        "results": results,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="model name to send (default: the server's first model)")
    p.add_argument("--rates", default="1,2,4,8,inf", help="requests per second, comma-separated; inf: all at once")
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate (at most, with --duration)")
    p.add_argument("--duration", type=float, help="for finite rates: send about rate x duration requests "
                   "(capped by --num-requests)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--vocab-size", type=int, help="prompt token ids are drawn below this (default: the server's)")
    p.add_argument("--min-token-id", type=int, default=10, help="prompt token ids are drawn from here up")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the sweep")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per request")
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.prompt_len < 1 or args.output_len < 1 or args.num_requests < 1:
        p.error("--prompt-len, --output-len and --num-requests must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
