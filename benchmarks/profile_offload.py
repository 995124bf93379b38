"""Where an offloaded decode step spends its host time, and what the process holds on the GPU.

    python benchmarks/profile_offload.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB --batch 1

Prints the memory plan against torch's allocator and NVML after loading, after a prefill and
after decoding; then a cProfile of decode steps (host time by function, blocking calls show as
long self time) and a torch profile of a few steps (CPU and CUDA time by op).
"""

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moetier import LLM, SamplingParams
from moetier.gpu_memory import process_gpu_bytes


def memory(stage: str) -> None:
    gib = 1 << 30
    print(f"{stage:>14}: allocated {torch.cuda.memory_allocated() / gib:.2f}  max allocated "
          f"{torch.cuda.max_memory_allocated() / gib:.2f}  reserved {torch.cuda.memory_reserved() / gib:.2f}  "
          f"NVML {(process_gpu_bytes() or 0) / gib:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--gpu-memory", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--predictor", default="gate")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=641, max_num_seqs=8,
              max_num_batched_tokens=2048, gpu_memory=args.gpu_memory, predictor=args.predictor)
    print(llm.engine.resolved.memory_plan)
    memory("loaded")
    engine = llm.engine
    prompts = torch.randint(0, engine.source.spec.vocab_size, (args.batch, 512)).tolist()
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps + 20, ignore_eos=True))
    for _ in range(4):  # prefill and a few decode steps
        engine.step()
    torch.cuda.synchronize()
    memory("after prefill")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    elapsed = time.perf_counter() - start
    memory("after decode")
    print(f"decode step {elapsed / args.steps * 1e3:.2f} ms (under cProfile)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(torch.cuda.memory_summary(abbreviated=True))


if __name__ == "__main__":
    main()
