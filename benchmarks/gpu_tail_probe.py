"""The GPU work between one expert copy and the next where the copy engine idles (the part of its idle
time that the GPU, not the host, spends): a torch.profiler trace of two offloaded decode steps (or, with
--prefill N, of one N-token prefill after a warm-up one); per gap, the kernels and small copies by name
(calls, microseconds), the GPU's idle time between them, and the time from the last of them to the next
expert copy (routing read, host planning, launch); the copies' busy time and span; the idle time by gap
length. With --timelines N, also N gaps of about the median length, op by op, with the CUDA runtime calls the
host made in them (--largest: the N longest gaps instead).

    python benchmarks/gpu_tail_probe.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --routing synthetic:uniform [--prefill 512] [--timelines 3 [--largest]]
"""

import argparse
import itertools
import json
import os
import tempfile

import torch
from offload_probe import add_arguments, load, prefill_call
from torch.profiler import ProfilerActivity, profile

from moetier import SamplingParams

EXPERT_COPY_MIN_BYTES = 1 << 20  # smaller host-to-device copies are slot tables
GAP_MIN_US = 20  # shorter stretches between copies are back to back


def is_expert_copy(event: dict) -> bool:
    return (event.get("cat") == "gpu_memcpy" and "HtoD" in event.get("name", "")
            and event.get("args", {}).get("bytes", 0) >= EXPERT_COPY_MIN_BYTES)


def expert_copies(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if is_expert_copy(e)), key=lambda e: e["ts"])


def copy_gaps(copies: list[dict]) -> list[tuple[float, float]]:
    """(end of one expert copy, start of the next) wherever the copy engine idled at least GAP_MIN_US."""
    gaps = ((before["ts"] + before["dur"], after["ts"]) for before, after in itertools.pairwise(copies))
    return [(end, start) for end, start in gaps if start - end >= GAP_MIN_US]


def tail_by_op(events: list[dict]) -> dict:
    copies = expert_copies(events)
    gpu_ops = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and not is_expert_copy(e)),
                     key=lambda e: e["ts"])
    by_name, gap_list, idle_us, to_next_copy_us = {}, [], 0.0, 0.0
    for end, start in copy_gaps(copies):
        gap_list.append(start - end)
        clock = end
        for op in (op for op in gpu_ops if end <= op["ts"] < start):
            idle_us += max(0.0, op["ts"] - clock)
            clock = max(clock, op["ts"] + op["dur"])
            calls, us = by_name.get(op["name"][:60], (0, 0.0))
            by_name[op["name"][:60]] = (calls + 1, us + op["dur"])
        to_next_copy_us += start - clock
    gaps, gap_us, per_gap = len(gap_list), sum(gap_list), max(len(gap_list), 1)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    span_us = copies[-1]["ts"] + copies[-1]["dur"] - copies[0]["ts"] if copies else 0.0
    return {"copies": len(copies), "copy_busy_us": round(sum(c["dur"] for c in copies)), "copy_span_us": round(span_us),
            "gaps": gaps, "gap_us_mean": round(gap_us / per_gap, 1),
            "gap_us_median": round(sorted(gap_list)[gaps // 2], 1) if gaps else 0.0,
            "gap_us_largest": [round(g) for g in sorted(gap_list)[-4:]],
            "gap_us_by_length": gaps_by_length(gap_list),
            "gpu_idle_between_ops_us_per_gap": round(idle_us / per_gap, 1),
            "last_op_to_next_copy_us_per_gap": round(to_next_copy_us / per_gap, 1),
            "ops_per_gap": {name: [round(calls / per_gap, 2), round(us / per_gap, 1)] for name, (calls, us) in top}}


def gaps_by_length(gap_list: list[float]) -> dict:
    """Gaps and their summed microseconds per length bucket: where the idle time concentrates."""
    edges = [0, 100, 200, 400, 1000, float("inf")]
    buckets = {}
    for low, high in itertools.pairwise(edges):
        inside = [g for g in gap_list if low <= g < high]
        buckets[f"{low}-{high}"] = [len(inside), round(sum(inside))]
    return buckets


def gap_timelines(events: list[dict], count: int, largest: bool = False) -> list[list]:
    """`count` gaps around the median length (or the longest), each as [gap us, then (start us from the gap's start, duration
    us, name) of every GPU op and CUDA runtime call in it, in start order]: which kernel or host call the
    copy engine waits for."""
    timed = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime")
                    and not is_expert_copy(e) and "dur" in e), key=lambda e: e["ts"])
    gaps = sorted(((start - end, end, start) for end, start in copy_gaps(expert_copies(events))), key=lambda g: g[0])
    middle = len(gaps) // 2
    picked = gaps[-count:] if largest else gaps[max(0, middle - count // 2): middle - count // 2 + count]
    return [[round(length)] + [(round(e["ts"] - end, 1), round(e["dur"], 1), e["name"][:48])
                               for e in timed if end - 5 <= e["ts"] < start]
            for length, end, start in picked]


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    parser.add_argument("--timelines", type=int, default=0, help="also print this many gaps' timelines")
    parser.add_argument("--largest", action="store_true", help="the timelines of the longest gaps, not the median ones")
    args = parser.parse_args()
    llm = load(args, max(577, args.prefill + 1))
    engine = llm.engine
    if args.prefill:
        prefill = prefill_call(llm, args.prefill)
        prefill()  # warm-up: kernels for this shape compiled
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill()
            torch.cuda.synchronize()
    else:
        for prompt in torch.randint(0, engine.source.spec.vocab_size, (args.batch, 512)).tolist():
            engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(args.batch + 12):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                engine.step()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    print(json.dumps({"model": args.model, "routing": args.routing, "batch": args.batch, "prefill": args.prefill,
                      **tail_by_op(events)}))
    for timeline in gap_timelines(events, args.timelines, args.largest):
        print(json.dumps(timeline))


if __name__ == "__main__":
    main()
