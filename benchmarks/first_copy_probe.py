"""Where the copy engine idles in offloaded decode, per MoE layer: the host time from the routing read's
return to the first expert copy issued, the prefetch window's measures (the copy engine's idle window
between layers and one expert copy's time, from CUDA events), and what is left of the step (its boundary:
lm_head, sampling, the next step's first layer), with the planner's spare slots set to each value of
--spares in turn, in one process. One JSON line per setting.

    python benchmarks/first_copy_probe.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --routing synthetic:uniform [--spares 2,0,2] [--steps 14]
"""

import argparse
import json
import time

import torch
from offload_probe import add_arguments, load

from moetier import SamplingParams

PROMPT, MAX_MODEL_LEN = 512, 577  # as `moetier bench --prompt-len 512 --output-len 64` sizes its KV cache


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--spares", default="2,0,2")
    parser.add_argument("--steps", type=int, default=14)
    args = parser.parse_args()
    spares = [int(s) for s in args.spares.split(",")]
    warm = args.batch + 8
    if PROMPT + warm + len(spares) * (args.steps + 1) > MAX_MODEL_LEN:
        raise SystemExit("too many steps for the KV cache: lower --steps")
    engine = load(args, MAX_MODEL_LEN).engine
    executor = engine.executor
    for prompt in torch.randint(0, engine.source.spec.vocab_size, (args.batch, PROMPT)).tolist():
        engine.add_request(prompt, SamplingParams(max_tokens=MAX_MODEL_LEN - PROMPT, ignore_eos=True))
    for _ in range(warm):
        engine.step()
    read_at, firsts = [None], []  # the last routing read's return; per layer step, its first copy's issue

    read_routing = executor._read_routing

    def timed_read(*args):
        result = read_routing(*args)
        read_at[0] = time.perf_counter()
        return result

    copy = executor.copy_engine.copy

    def timed_copy(*args):
        event = copy(*args)
        if read_at[0] is not None:
            firsts.append(time.perf_counter() - read_at[0])
            read_at[0] = None
        return event

    executor._read_routing, executor.copy_engine.copy = timed_read, timed_copy
    layers = len(executor.moe_layers)
    for spare in spares:
        executor.planner.spare = spare
        engine.step()  # the switch's step (slots freed or kept) is not timed
        firsts.clear()
        before = engine.offload_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        copies = (engine.offload_stats()["bytes_copied"] - before["bytes_copied"]) / executor.layout.slot_bytes / args.steps
        copy_us, window_us = executor.window.copy_s * 1e6, executor.window.window_s * 1e6
        busy_ms, windows_ms = copies * copy_us / 1e3, (layers - 1) * window_us / 1e3
        print(json.dumps({
            "model": args.model, "routing": args.routing, "batch": args.batch, "spare": spare,
            "step_ms": round(step_ms, 3), "copies_per_step": round(copies, 2), "copy_us": round(copy_us, 1),
            "window_us": round(window_us, 1),
            "host_read_to_first_copy_us": round(1e6 * sum(firsts) / max(1, len(firsts)), 1),
            "layers_with_copies_per_step": round(len(firsts) / args.steps, 2),
            "copy_busy_ms": round(busy_ms, 3), "windows_ms": round(windows_ms, 3),
            "boundary_ms": round(step_ms - busy_ms - windows_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
