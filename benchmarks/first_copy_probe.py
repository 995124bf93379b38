"""Where the copy engine idles in offloaded decode, per MoE layer: the host time from the routing read's
wait returning (a stream sync, or a graphed step's mailbox poll) to the first expert copy issued, and its
median stages (the distinct experts found, the spare-slot booking, the store's and the copy engine's copy called, the stream wait on the slot's
reader returned, cudaMemcpyAsync called and returned, the copy call returned), the prefetch window's
measures (the copy engine's idle window between layers and one expert copy's time, from CUDA events),
and what is left of the step (its boundary: lm_head, sampling, the next step's first layer), with the
planner's spare slots set to each value of --spares in turn, in one process. One JSON line per setting.

    python benchmarks/first_copy_probe.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --routing synthetic:uniform [--spares 2,0,2] [--steps 14]
"""

import argparse
import json
import statistics
import time

import torch
from offload_probe import add_arguments, load

from moetier import SamplingParams
from moetier.kernels.routing_mailbox import RoutingMailbox

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
    # Per layer step, host times from the routing read's wait returning ("sync") to each stage.
    marks: dict[str, float] = {}
    stages: dict[str, list[float]] = {s: [] for s in ("read", "claim", "copy_in", "copy_called", "waited", "memcpy_called",
                                                       "memcpy_returned", "copy")}
    firsts = stages["copy"]

    def mark(name: str) -> None:
        if "sync" in marks and name not in marks:
            marks[name] = time.perf_counter()

    def hook(owner, name: str, entered: str | None = None, returned: str | None = None) -> None:
        inner = getattr(owner, name)

        def timed(*args):
            if entered:
                mark(entered)
            result = inner(*args)
            if returned:
                mark(returned)
            return result
        setattr(owner, name, timed)

    synchronize = torch.cuda.Stream.synchronize

    def timed_sync(stream):
        synchronize(stream)
        marks.clear()
        marks["sync"] = time.perf_counter()

    torch.cuda.Stream.synchronize = timed_sync
    routing_regions = {call.published.routing for calls in engine.runner.graphs.calls.values() for call in calls
                       if call.published is not None}
    mailbox_read = RoutingMailbox.read

    def timed_mailbox_read(mailbox, region, count):
        ids = mailbox_read(mailbox, region, count)
        if region in routing_regions:
            marks.clear()
            marks["sync"] = time.perf_counter()
        return ids

    RoutingMailbox.read = timed_mailbox_read
    hook(executor, "_read_routing", returned="read")
    hook(executor.planner, "claim_free", returned="claim")
    hook(executor.store, "copy_in", entered="copy_in")
    hook(executor.copy_engine.stream, "wait_event", returned="waited")
    if executor.copy_engine.memcpy is not None:
        hook(executor.copy_engine, "memcpy", entered="memcpy_called", returned="memcpy_returned")
    copy = executor.copy_engine.copy

    def timed_copy(*args):
        mark("copy_called")
        event = copy(*args)
        if "sync" in marks and "copy" not in marks:
            mark("copy")
            for stage, times in stages.items():
                if stage in marks:
                    times.append(marks[stage] - marks["sync"])
        return event

    executor.copy_engine.copy = timed_copy
    layers = len(executor.moe_layers)
    for spare in spares:
        executor.planner.spare = spare
        engine.step()  # the switch's step (slots freed or kept) is not timed
        for times in stages.values():
            times.clear()
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
            "host_sync_to_first_copy_us": round(1e6 * sum(firsts) / max(1, len(firsts)), 1),
            "stages_median_us": {stage: round(1e6 * statistics.median(times), 1) for stage, times in stages.items() if times},
            "layers_with_copies_per_step": round(len(firsts) / args.steps, 2),
            "copy_busy_ms": round(busy_ms, 3), "windows_ms": round(windows_ms, 3),
            "boundary_ms": round(step_ms - busy_ms - windows_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
