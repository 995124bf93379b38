"""`moetier calibrate`: measure this machine's copy and memory bandwidths and expert compute times,
the bounds every benchmark and the offloading cost model report against. Saved as JSON in the user
cache directory, one profile per machine.

Conventions: a device-to-device copy counts bytes read plus bytes written (the HBM traffic);
host-to-device and device-to-host count bytes moved; host DRAM read and the CPU expert GEMV
count weight bytes read; a GPU expert's effective bandwidth counts its weight bytes (gate_up and
down, bf16) per call. The combined rates are pinned host-to-device copies and a CPU read running
at once (both draw on host DRAM), each counted over the window in which both ran.
"""

import json
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

_GIB = 1 << 30

# Reference expert shapes (hidden D, expert FFN width F): Mixtral 8x7B, Qwen3-30B-A3B.
GPU_EXPERT_SHAPES = ((4096, 14336), (2048, 768))
GPU_EXPERT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def profile_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "moetier" / f"calibration-{platform.node() or 'host'}.json"


def _cuda_seconds(fn, repeats: int, best: bool = False) -> float:
    """Median (or best) time of fn() on the current stream, by CUDA events, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times) if best else sorted(times)[len(times) // 2]


def _wall_seconds(fn, repeats: int) -> float:
    """Median wall time of fn(), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def concurrent_rates(workloads: Sequence[Callable[[], int]], seconds: float) -> list[float]:
    """Run the workloads at once and return each one's rate (its counted units per second) over the
    window in which all of them ran.

    Each workload does one unit of work per call and returns what it counts (bytes, say); it is
    called back to back. workloads[0] runs in the calling thread, the others in threads of their
    own (torch ops release the GIL). All start together at a barrier and each goes on until
    `seconds` have passed and every workload has finished a unit; the window closes when the first
    one stops, and a unit still running then is not counted.
    """
    start_line, stop = threading.Barrier(len(workloads)), threading.Event()
    timelines = [[] for _ in workloads]  # per workload: (time, count so far), from its start
    stopped_at = []

    def run(i: int) -> None:
        try:
            start_line.wait()
            timelines[i].append((time.perf_counter(), 0))
            deadline = timelines[i][0][0] + seconds
            while not stop.is_set():
                count = timelines[i][-1][1] + workloads[i]()
                timelines[i].append((time.perf_counter(), count))
                if timelines[i][-1][0] >= deadline and all(len(t) > 1 for t in timelines):
                    stopped_at.append(time.perf_counter())
                    break
        except BaseException:
            start_line.abort()  # free any thread still waiting at the start
            raise
        finally:
            stop.set()

    with ThreadPoolExecutor(max(1, len(workloads) - 1)) as pool:
        others = [pool.submit(run, i) for i in range(1, len(workloads))]
        run(0)
        for future in others:
            future.result()
    return [_rate_until(timeline, min(stopped_at)) for timeline in timelines]


def _rate_until(timeline: list[tuple[float, int]], end: float) -> float:
    """Count per second from a timeline's start to its last unit finished by `end`."""
    (start, _), (last, count) = timeline[0], [point for point in timeline if point[0] <= end][-1]
    return count / (last - start)


def device_copy_gbps(nbytes: int = _GIB, repeats: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _cuda_seconds(lambda: dst.copy_(src), repeats) / 1e9


def host_to_device_gbps(pinned: bool, nbytes: int = _GIB // 2, repeats: int = 10) -> float:
    """The best of `repeats` copies: the bound the offloading figures are measured against (a first
    copy on a fresh machine has read a third low)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch the pages, so the copy does not measure page faults
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / _cuda_seconds(lambda: dst.copy_(src, non_blocking=pinned), repeats, best=True) / 1e9


def device_to_host_gbps(nbytes: int = _GIB // 2, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return nbytes / _cuda_seconds(lambda: dst.copy_(src, non_blocking=True), repeats) / 1e9


def _host_sum(nbytes: int) -> Callable[[], int]:
    """One pass of torch's sum (all its threads) over an fp32 array of nbytes in host memory; each
    call returns the bytes read."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)

    def read() -> int:
        data.sum()
        return data.numel() * data.element_size()
    return read


def _pinned_host_to_device_copy(nbytes: int) -> Callable[[], int]:
    """A copy of nbytes from pinned host memory to the GPU on a stream of its own, waited for; each
    call returns the bytes moved."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)  # touch the pages
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps, leaving its core to the CPU side

    def copy() -> int:
        with torch.cuda.stream(stream):  # the current stream is per thread: set it in the caller's
            dst.copy_(src, non_blocking=True)
            done.record()
        done.synchronize()  # releases the GIL
        return nbytes
    return copy


def host_read_gbps(nbytes: int = 2 * _GIB, repeats: int = 5) -> float:
    """DRAM read bandwidth of a sum over a large fp32 array with all of torch's threads."""
    return nbytes / _wall_seconds(_host_sum(nbytes), repeats) / 1e9


def combined_host_gbps(copy_bytes: int = _GIB // 2, read_bytes: int = 2 * _GIB,
                       seconds: float = 1.0) -> tuple[float, float]:
    """(host-to-device GB/s, host read GB/s) while pinned copies to the GPU and a CPU sum over host
    memory run at once, as when missed experts stream in while the CPU computes others: both draw
    on host DRAM. The sum runs in this thread with torch's threads, the copies from another."""
    read, copy = _host_sum(read_bytes), _pinned_host_to_device_copy(copy_bytes)
    read(), copy()  # warm-up
    read_rate, copy_rate = concurrent_rates([read, copy], seconds)
    return copy_rate / 1e9, read_rate / 1e9


def cpu_expert_gbps(dtype: torch.dtype, rows: int = 8192, cols: int = 4096, repeats: int = 5) -> float:
    """Weight bytes per second of a one-token matrix-vector product on the CPU (an expert's GEMV at
    batch 1): the rate hybrid CPU execution of missed experts could reach with torch's kernels."""
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    seconds = _wall_seconds(lambda: torch.nn.functional.linear(x, weight), repeats)
    return weight.numel() * weight.element_size() / seconds / 1e9


def _swiglu_expert(x_TD: torch.Tensor, w_gate_up_2FD: torch.Tensor, w_down_DF: torch.Tensor) -> torch.Tensor:
    gate_TF, up_TF = torch.nn.functional.linear(x_TD, w_gate_up_2FD).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate_TF) * up_TF, w_down_DF)  # [T, D]


def _graph_seconds(fn, repeats: int) -> float:
    """Median time of one replay of a CUDA graph of fn(), by CUDA events: GPU time without the
    launch overhead of eager mode."""
    fn()  # warm-up outside the capture: cuBLAS picks its kernels and workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _cuda_seconds(graph.replay, repeats)


def gpu_expert_us(hidden: int, ffn: int, tokens: Sequence[int] = GPU_EXPERT_TOKENS,
                  repeats: int = 10) -> dict[int, float]:
    """Microseconds of one bf16 SwiGLU expert on the GPU (gate_up [T,D]x[D,2F], silu(gate) * up,
    down [T,F]x[F,D]) for each token count T, with plain torch ops. The time is an average over
    experts with distinct weights run back to back in one CUDA graph, enough of them to overflow
    the L2 cache four times, so the weights come from HBM as in decode."""
    weight_bytes = 3 * hidden * ffn * 2
    copies = max(2, math.ceil(4 * torch.cuda.get_device_properties(0).L2_cache_size / weight_bytes))
    w_gate_up_C2FD = torch.randn(copies, 2 * ffn, hidden, device="cuda", dtype=torch.bfloat16)
    w_down_CDF = torch.randn(copies, hidden, ffn, device="cuda", dtype=torch.bfloat16)

    def experts(x_TD: torch.Tensor) -> None:
        for c in range(copies):
            _swiglu_expert(x_TD, w_gate_up_C2FD[c], w_down_CDF[c])

    times = {}
    for t in tokens:
        x_TD = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
        times[t] = 1e6 * _graph_seconds(partial(experts, x_TD), repeats) / copies
    return times


def gpu_expert_profile(shapes: Sequence[tuple[int, int]] = GPU_EXPERT_SHAPES) -> dict:
    """Per shape, named `D{hidden}_F{ffn}`: microseconds per token count (string keys, as in the
    saved JSON), and the effective weight GB/s at one token."""
    us, gbps = {}, {}
    for hidden, ffn in shapes:
        name, times = f"D{hidden}_F{ffn}", gpu_expert_us(hidden, ffn)
        us[name] = {str(t): round(seconds_us, 1) for t, seconds_us in times.items()}
        gbps[name] = round(3 * hidden * ffn * 2 / times[1] / 1e3, 1)  # bytes per us / 1e3 = GB/s
    return {"gpu_expert_us": us, "gpu_expert_t1_weight_gbps": gbps}


def calibrate() -> dict:
    profile = {
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "host_read_gbps": round(host_read_gbps(), 1),
        "cpu_expert_gbps": {str(d).removeprefix("torch."): round(cpu_expert_gbps(d), 1)
                            for d in (torch.float32, torch.bfloat16)},
    }
    if torch.cuda.is_available():
        profile |= {
            "gpu": torch.cuda.get_device_name(),
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
            "device_copy_gbps": round(device_copy_gbps(), 1),
            "h2d_pinned_gbps": round(host_to_device_gbps(pinned=True), 1),
            "h2d_pageable_gbps": round(host_to_device_gbps(pinned=False), 1),
            "d2h_pinned_gbps": round(device_to_host_gbps(), 1),
        }
        copy, read = combined_host_gbps()
        profile |= {
            "combined_h2d_gbps": round(copy, 1),
            "combined_host_read_gbps": round(read, 1),
            "combined_total_gbps": round(copy + read, 1),
        } | gpu_expert_profile()
    return profile


def load_or_calibrate() -> dict:
    path = profile_path()
    if path.is_file():
        return json.loads(path.read_text())
    return save(calibrate())


def save(profile: dict) -> dict:
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return profile
