"""Host microseconds per call of what the copy path calls, each timed over 2000 calls: torch's copy_ of a
pinned slice, a new event recorded (plain and timing), an event recorded again, a stream wait, entering
and leaving a stream context, looking up the current stream, and cudaMemcpyAsync through ctypes (the
runtime library torch loaded), also one call at a time on an idle stream: by size, and an expert's alone,
after a stream wait and from a 32 GiB pinned arena. One JSON object.

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
        costs["ctypes_memcpy_after_sync"] = memcpy_after_sync_us(memcpy, stream, device)
        costs["expert_memcpy_after_sync"] = expert_memcpy_after_sync_us(memcpy, stream, device)
    print(json.dumps(costs))


def memcpy_after_sync_us(memcpy, stream: torch.cuda.Stream, device: torch.device) -> dict[str, float]:
    """Median host us of one cudaMemcpyAsync issued on an idle copy stream (as a layer's first expert copy
    is), by size: whether the call's cost grows with the bytes it moves."""
    src = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    costs = {}
    for size in (4 << 10, 256 << 10, 1 << 20, 4 << 20, 9437184, 16 << 20, 64 << 20):
        times = []
        for _ in range(200):
            stream.synchronize()
            start = time.perf_counter()
            memcpy(dst.data_ptr(), src.data_ptr(), size, stream.cuda_stream)
            times.append(time.perf_counter() - start)
        costs[str(size)] = round(sorted(times)[len(times) // 2] * 1e6, 2)
    return costs


def expert_memcpy_after_sync_us(memcpy, stream: torch.cuda.Stream, device: torch.device,
                                arena_gib: int = 32) -> dict[str, float]:
    """Median host us of a layer's first expert copy (9 MiB) on an idle copy stream: alone, after a
    stream wait on a completed compute-stream event (the slot's last reader), and the same with the
    source in a pinned arena of arena_gib GiB in 256 MiB chunks (as a large model's host store is)."""
    size = 9437184
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    small = torch.empty(size, dtype=torch.uint8).pin_memory()
    chunks = [torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(arena_gib * 4)]
    reader = torch.cuda.Event()
    compute = torch.cuda.current_stream(device)

    def median_us(src: torch.Tensor, wait: bool) -> float:
        times = []
        for _ in range(200):
            reader.record(compute)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            if wait:
                stream.wait_event(reader)
            memcpy(dst.data_ptr(), src.data_ptr(), size, stream.cuda_stream)
            times.append(time.perf_counter() - start)
        return round(sorted(times)[len(times) // 2] * 1e6, 2)

    return {"alone": median_us(small, False), "after_wait": median_us(small, True),
            "arena": median_us(chunks[-1][:size], False), "arena_after_wait": median_us(chunks[-1][:size], True)}


if __name__ == "__main__":
    main()
