"""What is live on the GPU when a budgeted run runs out: the device tensors at the failing
allocation, summed by the moetier line that allocated them.

    python benchmarks/memory_at_oom.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --routing replay:benchmarks/results/traces/donor-qwen3-30b-a3b/heldout.npz

Runs the bench's batch prefill (BATCH prompts of 512 tokens, 2048-token steps) and a few decode
steps under the budget's allocator cap with torch's allocation history on; prints the plan, what
is allocated once loaded, the allocator's peak, and, at an out-of-memory error, the live blocks by
allocating line. `memory_at_oom.py bench ARGS...` runs `moetier bench ARGS` the same way.
"""

import argparse
import sys
from collections import Counter

import torch

from moetier import LLM, SamplingParams

GIB = 1 << 30


def live_by_line(snapshot: dict) -> Counter:
    """Bytes of active blocks keyed by the two innermost moetier frames of their allocation stack."""
    by_line: Counter = Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if "/moetier/" in f["filename"]][:2]
            key = " <- ".join(f"{f['filename'].split('/moetier/')[-1]}:{f['line']} {f['name']}" for f in frames)
            by_line[key or "(no moetier frame)"] += block["size"]
    return by_line


def print_live_blocks(error: torch.OutOfMemoryError) -> None:
    """The error's first line, then the 30 largest sums of live blocks by allocating line."""
    print("OOM:", str(error).splitlines()[0])
    for line, size in live_by_line(torch.cuda.memory._snapshot()).most_common(30):
        print(f"{size / (1 << 20):10.1f} MiB  {line}")


def bench_under_history(bench_args: list[str]) -> None:
    """`moetier bench ARGS` with the allocation history on; at an out-of-memory error, the live blocks."""
    from moetier.cli import main as cli_main

    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        cli_main(["bench", *bench_args])
    except torch.OutOfMemoryError as error:
        print_live_blocks(error)


def main() -> None:
    if sys.argv[1:2] == ["bench"]:
        bench_under_history(sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--gpu-memory", required=True)
    parser.add_argument("--routing", default="router")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=561, max_num_seqs=args.batch,
              max_num_batched_tokens=2048, gpu_memory=args.gpu_memory)
    engine = llm.engine
    print(engine.resolved.memory_plan, flush=True)
    if args.routing != "router":
        from moetier.trace.replay import replay_routing, routing_trace_for

        replay_routing(engine, routing_trace_for(engine, args.routing))
    print(f"loaded: allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB", flush=True)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    torch.cuda.reset_peak_memory_stats()
    for prompt in torch.randint(0, engine.source.spec.vocab_size, (args.batch, 512)).tolist():
        engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    try:
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
        print(f"no OOM: peak allocated {torch.cuda.max_memory_allocated() / GIB:.3f} GiB, peak reserved "
              f"{torch.cuda.max_memory_reserved() / GIB:.3f} GiB")
    except torch.OutOfMemoryError as error:
        print_live_blocks(error)


if __name__ == "__main__":
    main()
