"""Slot lookup: each routed expert's slot, slots_A[a] = table_E[ids_A[a]], from a table on the device or in
pinned host memory (read through the unified address space).

A captured offloaded decode step reads its table from pinned memory that the host writes right before the
graph's launch: no upload to queue (a copy and its event, ~30 us of host time a replay on the device H100)
between the layer's routing read and the next layer's launch, and no device table to keep in step. The
GPU reads the few entries it needs over PCIe, ~1 us.
Legend: A routed assignments, E experts.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 256

if triton is not None:

    @triton.jit
    def _slot_lookup_kernel(table_ptr, ids_ptr, slots_ptr, n, BLOCK: tl.constexpr):
        for start in range(0, n, BLOCK):
            a = start + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + a, mask=a < n)
            tl.store(slots_ptr + a, tl.load(table_ptr + ids, mask=a < n), mask=a < n)


def lookup_slots(table_E: torch.Tensor, ids_A: torch.Tensor) -> torch.Tensor:
    """int64 [A] slots of the int64 ids in the int64 table: on the GPU from a table on the device or in pinned
    host memory; on the CPU (the tests' stand-in executors) by plain indexing."""
    if not ids_A.is_cuda:
        return table_E[ids_A]
    if not (ids_A.is_contiguous() and table_E.is_contiguous()):
        raise ValueError("look slots up from contiguous tables and ids")
    if not (table_E.is_cuda or table_E.is_pinned()):
        raise ValueError("the GPU reads the table: keep it on the device or in pinned host memory")
    slots_A = torch.empty_like(ids_A)
    _slot_lookup_kernel[(1,)](table_E, ids_A, slots_A, ids_A.numel(), BLOCK=BLOCK)
    return slots_A
