"""`moetier calibrate`: measure this machine's copy and memory bandwidths, the bounds every
benchmark reports against. Saved as JSON in the user cache directory, one profile per machine.

Conventions: a device-to-device copy counts bytes read plus bytes written (the HBM traffic);
host-to-device and device-to-host count bytes moved; host DRAM read and the CPU expert GEMV
count weight bytes read.
"""

import json
import os
import platform
import time
from pathlib import Path

import torch

_GIB = 1 << 30


def profile_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "moetier" / f"calibration-{platform.node() or 'host'}.json"


def _cuda_seconds(fn, repeats: int) -> float:
    """Median time of fn() on the current stream, by CUDA events, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def device_copy_gbps(nbytes: int = _GIB, repeats: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _cuda_seconds(lambda: dst.copy_(src), repeats) / 1e9


def host_to_device_gbps(pinned: bool, nbytes: int = _GIB // 2, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch the pages, so the copy does not measure page faults
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / _cuda_seconds(lambda: dst.copy_(src, non_blocking=pinned), repeats) / 1e9


def device_to_host_gbps(nbytes: int = _GIB // 2, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return nbytes / _cuda_seconds(lambda: dst.copy_(src, non_blocking=True), repeats) / 1e9


def host_read_gbps(nbytes: int = 2 * _GIB, repeats: int = 5) -> float:
    """DRAM read bandwidth of a sum over a large fp32 array with all of torch's threads."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def cpu_expert_gbps(dtype: torch.dtype, rows: int = 8192, cols: int = 4096, repeats: int = 5) -> float:
    """Weight bytes per second of a one-token matrix-vector product on the CPU (an expert's GEMV at
    batch 1): the rate hybrid CPU execution of missed experts could reach with torch's kernels."""
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    torch.nn.functional.linear(x, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        times.append(time.perf_counter() - start)
    return weight.numel() * weight.element_size() / sorted(times)[len(times) // 2] / 1e9


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
