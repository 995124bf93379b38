"""Where the copy engine idles in offloaded decode steps, with and without next-layer prediction.

    python benchmarks/profile_copy_gaps.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --batches 1,8 --routings router,synthetic:uniform --predictors gate,none

Loads the model once; for each (routing, predictor, batch): prefills, times decode steps (tok/s,
the executor's counters: miss bytes, copy efficiency against the calibrated pinned bandwidth,
prediction precision), then profiles a few steps with torch.profiler, takes the host-to-device
expert copies (the large ones) off the timeline and splits every idle stretch between two copies
into: the GPU finishing the work that the routing read waits for (from the end of the last copy to
the last kernel or routing copy before the host's stream sync returns; then the sync's wake-up), the
host planning and issuing (sync end to the launch of the next copy, with the host ops in that stretch
by name), and launch latency (launch to the copy's start). Prints one JSON object per line.
"""

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moetier import LLM, SamplingParams
from moetier.bench import offload_figures
from moetier.moe.layer import MoELayer
from moetier.offload.calibrate import host_to_device_gbps
from moetier.offload.predict import make_predictor
from moetier.trace.replay import replay_routing, routing_trace_for

EXPERT_COPY_MIN_BYTES = 1 << 20  # smaller copies are routing ids and slot tables


def copy_gaps(trace: dict, steps: int) -> dict:
    events = trace["traceEvents"]
    copies = sorted((e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
                     and e.get("args", {}).get("bytes", 0) >= EXPERT_COPY_MIN_BYTES), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "Memcpy" in e.get("name", "")}
    syncs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", ""))
    # GPU work on the compute side: kernels and the routing's device-to-host copies
    gpu_ends = sorted(e["ts"] + e["dur"] for e in events
                      if e.get("cat") == "kernel" or (e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")))
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "cuda_runtime")]
    busy = sum(c["dur"] for c in copies)
    span = copies[-1]["ts"] + copies[-1]["dur"] - copies[0]["ts"] if copies else 0.0
    gpu_wait = wake = host = launch = late = 0.0
    gaps, host_by_op, lengths = 0, {}, []
    for before, after in zip(copies, copies[1:]):
        end, start = before["ts"] + before["dur"], after["ts"]
        if start - end < 5.0:  # back to back (us)
            continue
        gaps += 1
        lengths.append(start - end)
        issued = launches.get(after["args"].get("correlation"))
        issued_at = issued["ts"] if issued else start
        woke = [t for t in syncs if end <= t <= issued_at]
        if not woke:  # issued before the last copy ended, or with no routing read between: host-side
            late += start - end
            continue
        worked = [t for t in gpu_ends if end <= t <= woke[-1]]
        gpu_done = worked[-1] if worked else end
        gpu_wait += gpu_done - end
        wake += woke[-1] - gpu_done
        host += issued_at - woke[-1]
        launch += start - issued_at
        for op in host_ops:  # top-level-ish: ops that start in the host stretch
            if woke[-1] <= op["ts"] < issued_at:
                host_by_op[op["name"]] = host_by_op.get(op["name"], 0.0) + op["dur"]
    per_step = 1e-3 / steps  # us -> ms per step
    lengths.sort(reverse=True)
    return {"expert_copies_per_step": len(copies) / steps,
            "copy_busy_ms_per_step": round(busy * per_step, 3), "copy_span_ms_per_step": round(span * per_step, 3),
            "busy_fraction": round(busy / span, 3) if span else None, "gaps_per_step": gaps / steps,
            "gap_gpu_work_after_copy_ms": round(gpu_wait * per_step, 3),
            "gap_sync_wake_ms": round(wake * per_step, 3),
            "gap_host_plan_and_issue_ms": round(host * per_step, 3),
            "gap_launch_latency_ms": round(launch * per_step, 3),
            "gap_other_ms": round(late * per_step, 3),
            "largest_gaps_us": [round(x) for x in lengths[: 2 * steps]],
            # host ops (under the profiler, so inflated) in the stretch from routing read to next copy
            "host_ops_us_per_step": {name: round(us / steps) for name, us in
                                     sorted(host_by_op.items(), key=lambda kv: -kv[1])[:14]}}


def set_routing(engine, routing: str) -> None:
    if routing == "router":
        for module in engine.model.modules():
            if isinstance(module, MoELayer):
                module.routing_override = None
        engine.runner.recapture_graphs()
    else:
        replay_routing(engine, routing_trace_for(engine, routing))


def run_one(llm: LLM, batch: int, steps: int, profile_steps: int, h2d_gbps: float) -> dict:
    engine = llm.engine
    prompts = torch.randint(0, engine.source.spec.vocab_size, (batch, 512)).tolist()
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=steps + profile_steps + 12, ignore_eos=True))
    for _ in range(batch + 8):  # the prefills and some decode steps
        engine.step()
    torch.cuda.synchronize()
    before, start = engine.offload_stats(), time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    figures = offload_figures(before, engine.offload_stats(), steps, step_s, batch, h2d_gbps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(profile_steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    stats = engine.executor.stats()
    return {"tok_s": round(batch / step_s, 2), "step_ms": round(step_s * 1e3, 3), **figures,
            "prefetch_window_s": stats["prefetch_window_s"],
            "expert_copy_s": stats["expert_copy_s"], "profile": copy_gaps(trace, profile_steps)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--gpu-memory", required=True)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--routings", default="router", help="router, replay:FILE or synthetic:KIND, comma-separated")
    parser.add_argument("--predictors", default="gate,none")
    args = parser.parse_args()
    h2d_gbps = host_to_device_gbps(pinned=True)
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
              max_num_batched_tokens=2048, gpu_memory=args.gpu_memory)
    engine = llm.engine
    for routing in args.routings.split(","):
        set_routing(engine, routing)
        for name in args.predictors.split(","):
            engine.executor.predictor = make_predictor(name, engine.model)
            for batch in map(int, args.batches.split(",")):
                result = run_one(llm, batch, args.steps, args.profile_steps, h2d_gbps)
                print(json.dumps({"model": args.model, "routing": routing, "predictor": name, "batch": batch,
                                  "num_slots": engine.executor.pool.num_slots, **result}), flush=True)


if __name__ == "__main__":
    main()
