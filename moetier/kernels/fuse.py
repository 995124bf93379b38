"""Fusion of elementwise chains on the GPU via torch.compile (inductor).

Small decode steps are launch-bound: an RMSNorm written in torch is six kernels, fused it is
one. `fused` compiles a pure tensor function for CUDA inputs and leaves CPU runs eager (tests,
tiny models). MOETIER_COMPILE=0 turns it off everywhere.
"""

import functools
import os

import torch

_ENABLED = os.environ.get("MOETIER_COMPILE", "1") != "0"
# Tests set this (e.g. "aot_eager") to trace the fused functions on the CPU: no graph breaks allowed.
cpu_backend: str | None = None


def fused(fn):
    compiled: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        backend = "inductor" if args[0].is_cuda else cpu_backend
        if not (_ENABLED and backend):
            return fn(*args, **kwargs)
        if backend not in compiled:
            compiled[backend] = torch.compile(fn, fullgraph=True, backend=backend)
        return compiled[backend](*args, **kwargs)

    return wrapper
