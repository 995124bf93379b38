"""Batch-1 resident decode with the step's CUDA graph captured in 1, 2, 4 or 8 pieces
(engine/cuda_graphs.py GRAPH_PIECES): whether the GPU idles while the host launches one large graph.
Each setting builds its own engine in this process; prints one JSON line per setting.

    python benchmarks/graph_pieces.py benchmarks/configs/qwen3-30b-a3b --pieces 1,2,4,8
"""

import argparse
import json
import time

import torch

from moetier import LLM, SamplingParams
from moetier.engine import cuda_graphs


def decode_tok_s(llm: LLM, steps: int) -> float:
    engine = llm.engine
    engine.add_request(list(range(100, 612)), SamplingParams(max_tokens=steps + 8, ignore_eos=True))
    for _ in range(8):  # the prefill and a few steps
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--pieces", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=1)
    for pieces in (int(p) for p in args.pieces.split(",")):
        cuda_graphs.GRAPH_PIECES = pieces
        llm.engine.runner.recapture_graphs()
        rates = [decode_tok_s(llm, args.steps) for _ in range(args.repeats)]
        print(json.dumps({"model": args.model, "pieces": pieces, "tok_s": [round(r, 1) for r in rates]}), flush=True)


if __name__ == "__main__":
    main()
