"""Kernel-level profile of resident decode steps (CUDA graph replays), for finding launch-bound work.

    python benchmarks/profile_decode.py benchmarks/configs/olmoe-1b-7b --batch 1
"""

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moetier import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=args.batch)
    engine = llm.engine
    prompts = torch.randint(0, engine.source.spec.vocab_size, (args.batch, 512)).tolist()
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=3 * args.steps + 16, ignore_eos=True))
    for _ in range(8):  # prefill and a few decode steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    print(f"decode step {(time.perf_counter() - start) / args.steps * 1e3:.3f} ms (wall)")
    profiler = cProfile.Profile()  # the host's share: what runs between graph replays
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
