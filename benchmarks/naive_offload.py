"""The naive load-on-demand baseline of the offloading benchmark: every MoE layer copies each expert
its step needs, with no cache (the pool forgets every expert after each round) and no overlap (the
copies run on the compute stream), then computes with the same kernels. Takes `moetier bench`'s
arguments and prints its JSON report:

    python benchmarks/naive_offload.py --model benchmarks/configs/mixtral-8x7b --load-format dummy \\
        --dtype bfloat16 --gpu-memory 24GiB --batch-sizes 1 --output-len 16
"""

import sys

import torch

from moetier.cli import _bench, _build_parser
from moetier.offload.copy_engine import CudaCopyEngine
from moetier.offload.planner import SlotPlanner


class ForgetfulPlanner(SlotPlanner):
    """No cache: after each layer step every expert leaves its slot, so each needed expert is a miss."""

    def end_step(self, protected):
        return [(self.release(expert), expert) for expert in list(self.slot_of)]


class ComputeStreamCopyEngine(CudaCopyEngine):
    """Copies on the compute stream: each waits for the kernels before it, and they for it."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.current_stream(device)


def make_naive(llm) -> None:
    executor = llm.engine.executor
    if llm.engine.offload_stats() is None:
        raise SystemExit("naive_offload: the model fits the budget; give a --gpu-memory that forces offloading")
    executor.planner = ForgetfulPlanner(executor.pool.num_slots, executor.planner.policy)
    executor.prefetch_next_layer = False
    if llm.engine.resolved.device.type == "cuda":
        executor.copy_engine = ComputeStreamCopyEngine(llm.engine.resolved.device)


if __name__ == "__main__":
    args = _build_parser().parse_args(["bench", *sys.argv[1:]])
    _bench(args, prepare=make_naive)
