"""FirstMissCopy: in a captured decode step, the GPU copies each MoE layer's first missed expert itself, right
after the layer's routing, from the pinned host arena into a free slot. The copy engine's copies start only
once the host has read the routing and planned (~45 us later on the device H100: the poll, the booking and
the cudaMemcpyAsync call); a kernel reads pinned memory through the unified address space at 43 GB/s
against the copy engine's 54, and beside the copy engine's copies the layer's experts land sooner
(benchmarks/zero_copy_rate.py).

The host decides everything but the routing before it launches the graph that computes it: per MoE layer, a
command row in pinned memory holds the slot to fill (-1: none), how many routing ids are real (padding rows
of a bucket are not) and the layer's expert -> slot table (-1: not resident). The kernel picks the smallest
routed expert whose entry is -1 and, if the arena holds it, copies its bytes into that slot. The host,
reading the routing, makes the same choice from the same state: SlotPlanner.claim_free books the smallest
missing expert into the lowest free slot, the slot the command named.
Legend: L MoE layers, E experts per layer, W 32-bit words per expert.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

IDS_BLOCK = 256
COPY_BLOCK = 4096  # words a program moves per step (the rate is the same from 66 to 1056 programs of 1024 or 4096)
NOT_IN_ARENA = -1  # the word offset (from the lowest chunk) of an expert the arena does not hold (on disk)
TABLE = 2  # a command row: the slot to fill, the count of real routing ids, then the table from here

if triton is not None:

    # One compiled kernel for every count and layer (warmed up in FirstMissCopy.__init__: captured kernels
    # cannot compile).
    @triton.jit(do_not_specialize=["num_experts", "words"],
                do_not_specialize_on_alignment=["ids_ptr", "command_ptr", "offsets_ptr"])
    def _first_miss_copy_kernel(ids_ptr, command_ptr, offsets_ptr, arena_ptr, bank_ptr, num_experts, words,
                                IDS: tl.constexpr, BLOCK: tl.constexpr):
        slot = tl.load(command_ptr)
        count = tl.load(command_ptr + 1)
        table_ptr = command_ptr + 2  # TABLE
        first = tl.cast(num_experts, tl.int64)
        for start in range(0, count, IDS):
            j = start + tl.arange(0, IDS)
            ids = tl.load(ids_ptr + j, mask=j < count, other=num_experts)
            held = tl.load(table_ptr + ids, mask=j < count, other=0)
            first = tl.minimum(first, tl.min(tl.where(held < 0, ids, num_experts)))
        if (slot >= 0) & (first < num_experts):
            offset = tl.load(offsets_ptr + first)
            if offset >= 0:  # not NOT_IN_ARENA
                # 16-byte aligned (FirstMissCopy.supported): whole blocks unmasked, in loads and stores of 4 words
                src = arena_ptr + tl.multiple_of(offset, 4)
                dst = bank_ptr + tl.multiple_of(slot * words, 4)
                whole = words // BLOCK * BLOCK
                for word in range(tl.program_id(0) * BLOCK, whole, tl.num_programs(0) * BLOCK):
                    i = tl.multiple_of(word, BLOCK) + tl.arange(0, BLOCK)
                    tl.store(dst + i, tl.load(src + i))
                if tl.program_id(0) == tl.num_programs(0) - 1:  # the last program copies the rest
                    i = whole + tl.arange(0, BLOCK)
                    tl.store(dst + i, tl.load(src + i, mask=i < words), mask=i < words)


class FirstMissCopy:
    def __init__(self, host_buffers: dict[int, list[torch.Tensor | None]], arena_chunks: list[torch.Tensor],
                 bank_SB: torch.Tensor):
        """host_buffers: per MoE layer, each expert's bytes in the pinned arena (None: on disk); arena_chunks:
        the arena's chunks (offsets are taken from the lowest); bank_SB: the device slots' bytes."""
        self.row_of = {layer: i for i, layer in enumerate(host_buffers)}  # MoE layer -> its command row
        num_experts = len(next(iter(host_buffers.values())))
        self.num_experts = num_experts
        self.words = bank_SB.shape[1] // 4
        self.device = bank_SB.device
        self.arena_W = min(arena_chunks, key=torch.Tensor.data_ptr).view(torch.int32)
        base = self.arena_W.data_ptr()
        offsets = [[NOT_IN_ARENA if b is None else (b.data_ptr() - base) // 4 for b in row]
                   for row in host_buffers.values()]
        self.offsets_LE = torch.tensor(offsets, dtype=torch.int64, device=self.device)
        self.bank_W = bank_SB.view(torch.int32).view(-1)
        self.commands = torch.full((len(host_buffers), TABLE + num_experts), -1, dtype=torch.int64, pin_memory=True)
        self.rows = self.commands.numpy()
        self.programs = torch.cuda.get_device_properties(self.device).multi_processor_count
        # compiled now, outside any capture: a command of slot -1 copies nothing
        self._launch(0, torch.zeros(1, dtype=torch.int64, device=self.device))  # row 0 is still all -1
        torch.cuda.synchronize(self.device)

    @staticmethod
    def supported(bank_SB: torch.Tensor, arena_chunks: list[torch.Tensor]) -> bool:
        """Triton, slots of whole 16-byte lines, and a pinned arena."""
        return (triton is not None and bank_SB.is_cuda and bank_SB.shape[1] % 16 == 0 and bool(arena_chunks)
                and arena_chunks[0].is_pinned())

    def capture(self, layer: int, ids: torch.Tensor) -> None:
        """Enqueues the kernel of MoE layer `layer` over its routing ids (contiguous int64)."""
        self._launch(self.row_of[layer], ids)

    def command(self, layer: int, slot: int, count: int, table_E) -> None:
        """What MoE layer `layer`'s kernel does next: fill `slot` (-1: nothing) with the first expert of the
        first `count` routing ids whose `table_E` entry is -1. Before the launch of its graph."""
        row = self.rows[self.row_of[layer]]
        row[0], row[1] = slot, count
        row[TABLE:] = table_E

    def _launch(self, row: int, ids: torch.Tensor) -> None:
        _first_miss_copy_kernel[(self.programs,)](
            ids, self.commands[row], self.offsets_LE[row], self.arena_W, self.bank_W, self.num_experts, self.words,
            IDS=IDS_BLOCK, BLOCK=COPY_BLOCK)
