"""Back-to-back expert copies (random 9.4 MB Qwen3-30B-A3B experts from an 8 GiB HostArena, through the
runtime's cudaMemcpyAsync as CudaCopyEngine issues them) by what is recorded between them: nothing, a
timing event after each, a plain (non-timing) event after each; spread over 2 or 3 streams (the H100's
several copy engines); against one copy of the same bytes. Rounds interleave the variants, so a drift of
the machine hits them alike. One JSON object: per variant GB/s [median, best, worst].

    python benchmarks/copy_events.py [--rounds 10]
"""

import argparse
import json
import random
import statistics

import torch
from arena_copy_rate import torch_pinned

from moetier.offload.copy_engine import runtime_memcpy

EXPERT_BYTES = 3 * 2048 * 768 * 2
COPIES = 42  # a batch-1 step of uniform Qwen3 at 12 GiB copies ~7 experts a layer, ~335 a step
ARENA_BYTES = 8 << 30
# name: (streams, event after each copy: None, "timing" or "plain")
VARIANTS = {"one_stream": (1, None), "one_stream_timing_events": (1, "timing"), "one_stream_plain_events": (1, "plain"),
            "two_streams": (2, None), "two_streams_timing_events": (2, "timing"), "three_streams": (3, None)}


class Copies:
    def __init__(self):
        self.memcpy = runtime_memcpy()
        if self.memcpy is None:
            raise SystemExit("no CUDA runtime library mapped: nothing to measure")
        self.experts, self.arena = torch_pinned(ARENA_BYTES, EXPERT_BYTES)
        self.slots = torch.empty(COPIES, EXPERT_BYTES, dtype=torch.uint8, device="cuda")
        self.whole = torch.ones(COPIES * EXPERT_BYTES, dtype=torch.uint8, pin_memory=True)
        self.streams = [torch.cuda.Stream() for _ in range(3)]
        self.compute = torch.cuda.current_stream()

    def timed(self, issue) -> float:
        """GB/s of the COPIES experts' bytes moved by `issue(streams)`, between events on the compute stream."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.compute)
        for stream in self.streams:
            stream.wait_stream(self.compute)
        issue()
        for stream in self.streams:
            self.compute.wait_stream(stream)
        end.record(self.compute)
        torch.cuda.synchronize()
        return COPIES * EXPERT_BYTES / (start.elapsed_time(end) / 1e3) / 1e9

    def experts_copied(self, streams: int, event: str | None) -> float:
        sources = random.sample(range(len(self.experts)), COPIES)

        def issue():
            for i, j in enumerate(sources):
                stream = self.streams[i % streams]
                self.memcpy(self.slots[i].data_ptr(), self.experts[j].data_ptr(), EXPERT_BYTES, stream.cuda_stream)
                if event is not None:
                    torch.cuda.Event(enable_timing=event == "timing").record(stream)
        return self.timed(issue)

    def one_copy(self) -> float:
        return self.timed(lambda: self.memcpy(self.slots.data_ptr(), self.whole.data_ptr(), COPIES * EXPERT_BYTES,
                                              self.streams[0].cuda_stream))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    copies = Copies()
    for variant in VARIANTS.values():  # warm-up
        copies.experts_copied(*variant)
    gbps = {name: [] for name in [*VARIANTS, "one_copy"]}
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            gbps[name].append(copies.experts_copied(*variant))
        gbps["one_copy"].append(copies.one_copy())
    print(json.dumps({"expert_bytes": EXPERT_BYTES, "copies": COPIES, "rounds": args.rounds,
                      **{name: [round(statistics.median(r), 2), round(max(r), 2), round(min(r), 2)]
                         for name, r in gbps.items()}}))


if __name__ == "__main__":
    main()
