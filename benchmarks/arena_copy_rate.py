"""Host-to-device rate of expert copies drawn at random from a pinned arena as large as an offloaded store, by
how the arena is backed: torch's pinned chunks (HostArena, as ExpertStore uses) or anonymous memory advised onto
transparent huge pages and registered with cudaHostRegister; against a small arena of 400 experts (what
expert_copy_rate.py measures). The question: does a store-sized arena behind a translating IOMMU (the device
VM's) copy slower than a small one, and do huge pages (512 times fewer translations) bring it back? The
executor's own per-copy time ranged 176-193 us for 9.4 MB Qwen3-30B-A3B experts across processes (172 at the
calibrated rate; results/2026-11-22-h100-offload/README.md, session 11). One JSON object.

    python benchmarks/arena_copy_rate.py --backing torch|huge [--gib 58] [--expert-bytes 9437184] [--batches 12]

One backing per process (58 GiB of each would not fit the device machine's memory together).
"""

import argparse
import json
import mmap
import random
import statistics
import time
from pathlib import Path

import torch

from moetier.offload.arena import HostArena

COPIES = 40  # expert copies per timed batch, into as many device slots
HUGE_PAGE = 2 << 20
SMALL_EXPERTS = 400


def torch_pinned(nbytes: int, expert_bytes: int) -> tuple[list[torch.Tensor], object]:
    """Experts allocated from a HostArena (torch's pinned allocator, 256 MiB chunks) as ExpertStore does, touched."""
    arena = HostArena(256 << 20)
    experts = [arena.allocate(expert_bytes) for _ in range(nbytes // expert_bytes)]
    for chunk in arena.chunks:
        chunk.fill_(1)
    return experts, arena


def huge_pages_registered(nbytes: int, expert_bytes: int) -> tuple[list[torch.Tensor], object]:
    """One anonymous mapping advised onto transparent huge pages (2 MiB aligned), touched, then pinned with
    cudaHostRegister; experts 256-byte aligned in it, as HostArena places them."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    whole = whole[start : start + nbytes]
    whole.fill_(1)
    error = torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), nbytes, 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {error}")
    stride = -(-expert_bytes // 256) * 256
    return [whole[i : i + expert_bytes] for i in range(0, nbytes - expert_bytes + 1, stride)], mapping


def rate(experts: list[torch.Tensor], slots: torch.Tensor, stream: torch.cuda.Stream, batches: int) -> list[float]:
    """GB/s of each timed batch of COPIES copies of random experts (the first batch warms up)."""
    out = []
    compute = torch.cuda.current_stream()
    for _ in range(batches + 1):
        sources = random.sample(range(len(experts)), COPIES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            for i, j in enumerate(sources):
                slots[i].copy_(experts[j], non_blocking=True)
        compute.wait_stream(stream)
        end.record(compute)
        torch.cuda.synchronize()
        out.append(COPIES * slots.shape[1] / (start.elapsed_time(end) / 1e3) / 1e9)
    return out[1:]


def anon_huge_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backing", choices=("torch", "huge"), default="torch")
    parser.add_argument("--gib", type=float, default=58.0, help="the large arena's size (Qwen3-30B-A3B's store: 58)")
    parser.add_argument("--expert-bytes", type=int, default=3 * 2048 * 768 * 2)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    slots = torch.empty(COPIES, args.expert_bytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    started = time.perf_counter()
    make = torch_pinned if args.backing == "torch" else huge_pages_registered
    experts, _backing = make(int(args.gib * 2**30), args.expert_bytes)
    made_s = time.perf_counter() - started
    small = rate(experts[:SMALL_EXPERTS], slots, stream, args.batches)
    large = rate(experts, slots, stream, args.batches)
    print(json.dumps({
        "backing": args.backing, "gib": args.gib, "expert_bytes": args.expert_bytes, "experts": len(experts),
        "alloc_s": round(made_s, 1), "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        "anon_huge_pages_gib": round(anon_huge_kib() / 2**20, 1),
        "small_gbps": [round(max(small), 1), round(statistics.median(small), 1)],
        "large_gbps": [round(max(large), 1), round(statistics.median(large), 1)]}))


if __name__ == "__main__":
    main()
