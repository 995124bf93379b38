"""Host-to-device rate of expert-sized copies (GB/s, best and median of 5 batches of 40), by what
surrounds them: one whole copy of the same bytes; the same, sequential or random sources in a pinned
HostArena of 400 experts; a stream wait on a completed event before each and an event recorded after
each (as the copy engine issues them); two copy streams taking turns. Expert sizes of the Qwen3-30B-A3B
and OLMoE-1B-7B shapes (bf16). One JSON object: {shape: {variant: [best, median]}}.

    python benchmarks/expert_copy_rate.py
"""

import json
import random
import statistics

import torch

from moetier.offload.arena import HostArena

COPIES, EXPERTS = 40, 400
SHAPES = {"qwen3": 3 * 2048 * 768 * 2, "olmoe": 3 * 2048 * 1024 * 2}
VARIANTS = {
    "whole": {"whole": True},
    "same_src": {"order": "same"},
    "sequential_src": {"order": "sequential"},
    "random_src": {},
    "random_wait": {"wait": True},
    "random_record": {"record": True},
    "random_wait_record": {"wait": True, "record": True},
    "random_2streams": {"streams_used": 2},
    "random_2streams_wait_record": {"streams_used": 2, "wait": True, "record": True},
}


def rates(slot_bytes: int, device: torch.device) -> dict[str, list[float]]:
    arena = HostArena(256 << 20)
    experts = [arena.allocate(slot_bytes) for _ in range(EXPERTS)]
    for chunk in arena.chunks:
        chunk.fill_(1)  # touch the pages
    slots = torch.empty(COPIES, slot_bytes, dtype=torch.uint8, device=device)
    whole_src = torch.empty(COPIES * slot_bytes, dtype=torch.uint8).pin_memory().fill_(1)
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    done = torch.cuda.Event()
    done.record(streams[0])
    torch.cuda.synchronize()

    def gbps(whole=False, order="random", wait=False, record=False, streams_used=1) -> float:
        sources = {"same": [0] * COPIES, "sequential": list(range(COPIES))}.get(order) or random.sample(range(EXPERTS), COPIES)
        compute = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        for stream in streams:
            stream.wait_stream(compute)
        if whole:
            with torch.cuda.stream(streams[0]):
                slots.view(-1).copy_(whole_src, non_blocking=True)
        for i, j in enumerate([] if whole else sources):
            stream = streams[i % streams_used]
            with torch.cuda.stream(stream):
                if wait:
                    stream.wait_event(done)
                slots[i].copy_(experts[j], non_blocking=True)
                if record:
                    torch.cuda.Event().record(stream)
        for stream in streams:
            compute.wait_stream(stream)
        end.record(compute)
        torch.cuda.synchronize()
        return COPIES * slot_bytes / (start.elapsed_time(end) / 1e3) / 1e9

    out = {}
    for name, options in VARIANTS.items():
        measured = [gbps(**options) for _ in range(6)][1:]  # the first warms up
        out[name] = [round(max(measured), 1), round(statistics.median(measured), 1)]
    return out


def main() -> None:
    device = torch.device("cuda")
    print(json.dumps({shape: rates(slot_bytes, device) for shape, slot_bytes in SHAPES.items()}))


if __name__ == "__main__":
    main()
