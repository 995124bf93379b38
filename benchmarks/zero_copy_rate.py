"""Can the GPU start a layer's first expert copy itself? The rate of a kernel that reads one expert from
pinned host memory (zero-copy, through the unified address space) into device memory, by how many programs
it runs and how many bytes each moves per step, against the copy engine's cudaMemcpyAsync of the same bytes;
and the time to land a layer's misses when the kernel copies the first while the copy engine copies the
rest on its own stream, against the copy engine copying all of them. Expert size of the Qwen3-30B-A3B
shape (bf16). One JSON object.

    python benchmarks/zero_copy_rate.py [--experts 7] [--repeats 20]
"""

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

EXPERT_BYTES = 3 * 2048 * 768 * 2


@triton.jit
def _pull_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """Grid-stride copy of n int32 words: program p moves blocks p, p + P, p + 2P, ..."""
    step = tl.num_programs(0) * BLOCK
    for start in range(tl.program_id(0) * BLOCK, n, step):
        i = start + tl.arange(0, BLOCK)
        tl.store(dst_ptr + i, tl.load(src_ptr + i, mask=i < n), mask=i < n)


def pull(src: torch.Tensor, dst: torch.Tensor, programs: int, block: int) -> None:
    _pull_kernel[(programs,)](src, dst, src.numel(), BLOCK=block)


def seconds(work, repeats: int) -> float:
    """Median seconds of `work` between two events on the current stream (work may use other streams
    that it joins back)."""
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        work()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    words = EXPERT_BYTES // 4
    host = [torch.randint(0, 2**31 - 1, (words,), dtype=torch.int32).pin_memory() for _ in range(args.experts)]
    slots = torch.empty(args.experts, words, dtype=torch.int32, device="cuda")
    copies = torch.cuda.Stream()
    compute = torch.cuda.current_stream()

    def layer(first: int, kernel_tile: tuple[int, int] | None = None) -> None:
        """Experts first.. by the copy engine; with a kernel tile (programs, block), expert 0 by the kernel
        meanwhile."""
        copies.wait_stream(compute)
        with torch.cuda.stream(copies):
            for e in range(first, args.experts):
                slots[e].copy_(host[e], non_blocking=True)
        if kernel_tile is not None:
            pull(host[0], slots[0], *kernel_tile)
        compute.wait_stream(copies)

    one_dma_s = seconds(lambda: layer(args.experts - 1), args.repeats)
    result = {"expert_bytes": EXPERT_BYTES, "dma_one_gbps": round(EXPERT_BYTES / one_dma_s / 1e9, 1)}
    kernel = {}
    for programs in (66, 132, 264, 528, 1056):
        for block in (1024, 4096):
            rate = EXPERT_BYTES / seconds(lambda p=programs, b=block: pull(host[0], slots[0], p, b), args.repeats) / 1e9
            kernel[f"{programs}x{block}"] = round(rate, 1)
    result["kernel_one_gbps"] = kernel
    tile = tuple(int(x) for x in max(kernel, key=kernel.get).split("x"))
    slots[0].zero_()
    pull(host[0], slots[0], *tile)
    torch.cuda.synchronize()
    assert torch.equal(slots[0].cpu(), host[0]), "the kernel's copy differs from its source"

    layer_bytes = args.experts * EXPERT_BYTES
    result["layer_dma_only_gbps"] = round(layer_bytes / seconds(lambda: layer(0), args.repeats) / 1e9, 1)
    result["layer_kernel_first_gbps"] = round(layer_bytes / seconds(lambda: layer(1, tile), args.repeats) / 1e9, 1)
    result["kernel_tile"] = list(tile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
