"""Host time per MoE layer step of offloaded decode (or, with --prefill N, of N-token prefills), by
executor function, and a cProfile of a few steps.

    python benchmarks/host_time_offload.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB \
        [--routing synthetic:uniform] [--batch 1] [--prefill 512]

Prefills one 512-token prompt per sequence, times 16 decode steps plainly, then 16 more with a
perf_counter wrapper around the executor's stages (run, the routing read and its sync, planning and
copies, compute, next-layer prefetch, the predictor), the calls they make into the planner, the slot pool,
the copy engine and the prefetch window, and the piecewise graphs' replay; prints their
host microseconds per MoE layer step as one JSON line (the wrappers add ~1 us each), then a cProfile
of 8 steps by self time. Where `run` minus the sync wait approaches the step time per layer, the
host, not the copy engine, sets the pace.
"""

import argparse
import cProfile
import io
import json
import pstats
import time
from collections import defaultdict

import torch
from offload_probe import add_arguments, load, prefill_call

from moetier import SamplingParams

STEPS = 16


def time_calls(owner, name: str, seconds: defaultdict, prefix: str = "", longest: dict | None = None) -> None:
    """Replaces owner.name by a wrapper that adds its wall time to seconds[prefix + name] (and keeps the
    longest call's in `longest`, if given)."""
    call = getattr(owner, name)
    key = prefix + name

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            seconds[key] += elapsed
            if longest is not None:
                longest[key] = max(longest.get(key, 0.0), elapsed)

    setattr(owner, name, wrapper)


def time_after_routing(executor, seconds: defaultdict) -> None:
    """seconds["after_routing"]: run()'s host time from its routing read's return to its own, the stretch
    a host late for the GPU holds the copy engine back in (the next layer's launch follows at once)."""
    read, run = executor._read_routing, executor.run
    read_end = [0.0]

    def timed_read(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        finally:
            read_end[0] = time.perf_counter()

    def timed_run(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        finally:
            seconds["after_routing"] += time.perf_counter() - read_end[0]

    executor._read_routing, executor.run = timed_read, timed_run


def seconds_per_call(call, count: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--prefill", type=int, default=0, help="time prefills of this many tokens, not decode steps")
    args = parser.parse_args()
    llm = load(args, max(1024, args.prefill + 1))
    engine = llm.engine
    executor = engine.executor
    if args.prefill:
        steps, profiled_steps = 3, 2
        step = prefill_call(llm, args.prefill)
        step()  # warm-up: kernels for this shape compiled
    else:
        steps, profiled_steps = STEPS, 8
        for prompt in torch.randint(0, engine.source.spec.vocab_size, (args.batch, 512)).tolist():
            engine.add_request(prompt, SamplingParams(max_tokens=3 * STEPS + 12, ignore_eos=True))
        for _ in range(args.batch + 8):  # the prefills and some decode steps
            engine.step()

        def step() -> None:  # looked up each call: the timing wrapper below replaces engine.step
            engine.step()

    def work(count: int) -> float:
        return seconds_per_call(step, count)
    plain_s = work(steps)
    seconds: defaultdict[str, float] = defaultdict(float)
    for name in ("run", "_read_routing", "_plan_and_copy", "_compute_all", "_compute_in_rounds", "_compute_round",
                 "_round_slots", "_prefetch_next", "_wait_for_copies", "_mark_read", "_score_guess", "_copy_claimed",
                 "_copied_by_gpu", "_replay_step", "_fold_in_timings", "_copy_into", "command_first_copy"):
        if hasattr(executor, name):  # (an older executor, run for comparison, may lack some)
            time_calls(executor, name, seconds)
    time_after_routing(executor, seconds)
    for name in ("access", "claim_free", "end_step", "start_round"):
        time_calls(executor.planner, name, seconds, "planner.")
    for name in ("table_of", "device_table", "assign"):
        time_calls(executor.pool, name, seconds, "pool.")
    for name in ("copy", "wait", "mark_read", "marker"):
        time_calls(executor.copy_engine, name, seconds, "copy_engine.")
    for name in ("copies_start", "window_ends", "copies_issued"):
        time_calls(executor.window, name, seconds, "window.")
    if executor.predictor is not None:
        time_calls(executor.predictor, "predict", seconds)
    time_calls(engine, "step", seconds)
    time_calls(engine.runner.graphs, "_replay", seconds)
    sync_before = executor.routing_sync_s
    timed_s = work(steps)
    layer_steps = steps * len(executor.moe_layers)
    print(json.dumps({
        "model": args.model, "routing": args.routing, "batch": args.batch, "prefill": args.prefill,
        "num_slots": executor.pool.num_slots,
        "step_ms_plain": round(plain_s * 1e3, 3), "step_ms_timed": round(timed_s * 1e3, 3),
        "us_per_layer_step": {k: round(v / layer_steps * 1e6, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        "sync_wait_us_per_layer": round((executor.routing_sync_s - sync_before) / layer_steps * 1e6, 1)}), flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    work(profiled_steps)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
    print(text.getvalue())


if __name__ == "__main__":
    main()
