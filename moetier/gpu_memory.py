"""GPU memory held by this process, as NVML counts it (context, weights, caches, graph pools, workspace)."""

import os
import subprocess


def process_gpu_bytes() -> int | None:
    """This process's device memory per NVML (via nvidia-smi), or None where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, used_mib = (field.strip() for field in line.split(","))
        if pid == str(os.getpid()):
            return int(used_mib) << 20
    return None
