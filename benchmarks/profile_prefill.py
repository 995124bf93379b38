"""CPU and CUDA profile of one resident prefill (eager), for finding host-bound work.

    python benchmarks/profile_prefill.py benchmarks/configs/olmoe-1b-7b --tokens 512
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
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=1,
              max_num_batched_tokens=4096)
    prompt = torch.randint(0, llm.engine.source.spec.vocab_size, (args.tokens,)).tolist()
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for _ in range(2):
        llm.generate([prompt], params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    profiler = cProfile.Profile()  # host time by Python function (compile wrappers, dispatch)
    start = time.perf_counter()
    profiler.enable()
    for _ in range(3):
        llm.generate([prompt], params)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"prefill {(time.perf_counter() - start) / 3 * 1e3:.2f} ms (under cProfile)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
