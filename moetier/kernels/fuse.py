"""Fusion of elementwise chains on the GPU via torch.compile (inductor).

Small decode steps are launch-bound: an RMSNorm written in torch is six kernels, fused it is
one. `fused` compiles a pure tensor function for CUDA inputs and leaves CPU runs eager (tests,
tiny models). MOETIER_COMPILE=0 turns it off everywhere.
"""

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_ENABLED = os.environ.get("MOETIER_COMPILE", "1") != "0"
# Tests set this (e.g. "aot_eager") to trace the fused functions on the CPU: no graph breaks allowed.
cpu_backend: str | None = None
# Each new shape class, dtype or spec constant compiles anew; a process serving several models
# needs more than dynamo's default of 8 versions per function.
torch._dynamo.config.recompile_limit = 256


def fused(fn):
    compiled: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        backend = "inductor" if args[0].is_cuda else cpu_backend
        if not (_ENABLED and backend):
            return fn(*args, **kwargs)
        if backend not in compiled:
            compiled[backend] = torch.compile(fn, fullgraph=True, backend=backend)
        try:
            return compiled[backend](*args, **kwargs)
        except torch._dynamo.exc.Unsupported as e:  # never fail a step over fusion: run it unfused
            log.warning("running %s unfused: %s", fn.__name__, str(e).splitlines()[0])
            compiled[backend] = fn
            return fn(*args, **kwargs)

    return wrapper
