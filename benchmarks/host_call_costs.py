"""Host microseconds per call of what the copy path calls, each timed over 2000 calls: torch's copy_ of a
pinned slice, a new event recorded (plain and timing), an event recorded again, a stream wait, entering
and leaving a stream context, looking up the current stream, and cudaMemcpyAsync through ctypes (the
runtime library torch loaded). One JSON object.

    python benchmarks/host_call_costs.py
"""

import json
import time

import torch

from moetier.offload.copy_engine import runtime_memcpy

CALLS = 2000


def per_call_us(call) -> float:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(seconds / CALLS * 1e6, 2)


def main() -> None:
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    src = torch.empty(4096, dtype=torch.uint8).pin_memory()
    dst = torch.empty(4096, dtype=torch.uint8, device=device)
    event = torch.cuda.Event()
    memcpy = runtime_memcpy()

    def stream_context() -> None:
        with torch.cuda.stream(stream):
            pass

    costs = {
        "copy_": per_call_us(lambda: dst.copy_(src, non_blocking=True)),
        "event_new_record": per_call_us(lambda: torch.cuda.Event().record(stream)),
        "timing_event_new_record": per_call_us(lambda: torch.cuda.Event(enable_timing=True).record(stream)),
        "event_record_reuse": per_call_us(lambda: event.record(stream)),
        "wait_event": per_call_us(lambda: stream.wait_event(event)),
        "stream_ctx": per_call_us(stream_context),
        "current_stream_idx": per_call_us(lambda: torch.cuda.current_stream(device.index or 0)),
    }
    if memcpy is not None:
        costs["ctypes_memcpy"] = per_call_us(lambda: memcpy(dst.data_ptr(), src.data_ptr(), 4096, stream.cuda_stream))
    print(json.dumps(costs))


if __name__ == "__main__":
    main()
