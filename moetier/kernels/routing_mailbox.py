"""RoutingMailbox: ids a captured decode step computes (each MoE layer's routing, the predictor's guess),
written by a kernel at the end of their graph straight into pinned host memory, where the host polls for
them: no device-to-host copy to launch and no stream sync between the router's kernels and the host
holding the ids (7-11 us sooner a read on the device H100: benchmarks/routing_read_latency.py).

Each publish() captured into a step's graphs gets a region of its own. The host arms the mailbox (every
entry -1) before launching the step's graphs; a region is complete once none of its entries is -1 (ids are
never negative). Entries are int32, one PCIe data word each, so the host never reads half of one.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PUBLISH_BLOCK = 256
# While a region is incomplete, the host checks this often whether the GPU still has work queued, so that
# a step whose publish can never run (a faulted kernel) raises instead of spinning forever.
IDLE_CHECK_S = 0.5

if triton is not None:

    # One compiled kernel for every count and offset (the warm-up in RoutingMailbox.__init__): publishes are
    # captured into graphs, where a kernel can no longer be compiled.
    @triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["ids_ptr", "box_ptr"])
    def _publish_kernel(ids_ptr, box_ptr, n, BLOCK: tl.constexpr):
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + i, mask=i < n)
            tl.store(box_ptr + i, ids.to(tl.int32), mask=i < n)


@dataclass(frozen=True)
class Region:
    start: int
    count: int


class RoutingMailbox:
    def __init__(self, capacity: int, device: torch.device):
        """Room for `capacity` ids over all the regions published into it."""
        self.host = torch.full((capacity,), -1, dtype=torch.int32, pin_memory=True)
        self.entries = self.host.numpy()
        self.device = device
        self._used = 0
        # compiled now, outside any capture, for the int64 ids routers and predictors give
        _publish_kernel[(1,)](torch.zeros(1, dtype=torch.int64, device=device), self.host, 1, BLOCK=PUBLISH_BLOCK)
        torch.cuda.synchronize(device)
        self.arm()

    def publish(self, ids: torch.Tensor) -> Region:
        """Enqueues the kernel that writes `ids` (contiguous int64, each below 2**31) into a new region."""
        count = ids.numel()
        if self._used + count > self.entries.size:
            raise ValueError(f"the mailbox holds {self.entries.size} ids; {self._used} are taken, {count} more asked")
        if not ids.is_contiguous():
            raise ValueError("publish contiguous ids")
        region = Region(self._used, count)
        box = self.host[region.start : region.start + count]
        _publish_kernel[(1,)](ids, box, count, BLOCK=PUBLISH_BLOCK)
        self._used += count
        return region

    def arm(self) -> None:
        """Marks every region unwritten: before launching the graphs whose kernels write them."""
        self.entries.fill(-1)

    def read(self, region: Region, count: int) -> np.ndarray:
        """The region's first `count` ids (a view), once they are all written."""
        view = self.entries[region.start : region.start + count]
        checked = time.perf_counter()
        while view.min() < 0:
            if time.perf_counter() - checked > IDLE_CHECK_S:
                if torch.cuda.current_stream(self.device).query() and view.min() < 0:
                    raise RuntimeError("routing ids were never published: the step's graph did not run to them")
                checked = time.perf_counter()
        return view
