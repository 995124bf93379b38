"""Tile sweep of the decode expert GEMV (kernels/expert_gemv.py) and cuBLAS GEMVs at decode shapes:
achieved HBM bandwidth per kernel inside a CUDA graph (no launch gaps, as in decode replays), each
call reading other experts than the last so that the 50 MB L2 holds none of them. Prints JSON lines.

    python benchmarks/gemv_sweep.py            # every shape, the whole grid
    python benchmarks/gemv_sweep.py --dense    # the dense decode GEMVs alone: cuBLAS and dense_gemv
    python benchmarks/gemv_sweep.py --one-active  # one token, one of its top-k rows computed, the others
                                                  # skipped: an offloaded step's last round (executor.py)
    python benchmarks/gemv_sweep.py --compare     # a few tiles per expert shape at all three: batch 1, batch 8,
                                                  # one active (a tile serves them all: results stay bitwise)
"""

import functools
import itertools
import json
import sys

import torch
import torch.nn.functional as F
import triton

from moetier.kernels.expert_gemv import _expert_gemv_kernel, dense_gemv

# name: (experts, N, K, swiglu input, top_k)
EXPERT_SHAPES = {
    "qwen3_gate_up": (128, 1536, 2048, False, 8),
    "qwen3_down": (128, 2048, 768, True, 8),
    "olmoe_gate_up": (64, 2048, 2048, False, 8),
    "olmoe_down": (64, 2048, 1024, True, 8),
}
# name: (N, K) of dense decode GEMVs
DENSE_SHAPES = {
    "qwen3_qkv": (5120, 2048), "qwen3_o": (2048, 4096), "qwen3_router": (128, 2048),
    "olmoe_qkv": (6144, 2048), "olmoe_o": (2048, 2048), "olmoe_router": (64, 2048),
}
# (BLOCK_N, BLOCK_K, warps, stages) tried for one token's dense GEMV
DENSE_TILES = [(1, 512, 2, 3), (2, 256, 2, 3), (2, 512, 4, 3), (4, 256, 2, 3), (4, 256, 4, 1), (1, 1024, 4, 3)]
CALLS_PER_GRAPH = 24
REPLAYS = 20


def graph_time_s(calls) -> float:
    """Seconds per call: the calls captured in one graph, replayed."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:  # warm up (and compile) outside the capture
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (REPLAYS * len(calls))


def tile_grid(block_ns=(4, 8, 16, 32)):
    for block_n, block_k, warps, stages in itertools.product(block_ns, (128, 256, 512, 1024), (2, 4, 8), (1, 3)):
        per_thread = block_n * block_k / (32 * warps)
        if 8 <= per_thread <= 64:
            yield block_n, block_k, warps, stages


def expert_calls(shape, tokens, block_n, block_k, warps, stages, one_active=False):
    experts, n, k, swiglu, top_k = shape
    w = torch.randn(experts, n, k, dtype=torch.bfloat16, device="cuda")
    assignments = tokens * top_k
    x = torch.randn(assignments if swiglu else tokens, 2 * k if swiglu else k, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(assignments, n, dtype=torch.bfloat16, device="cuda")
    calls = []
    for i in range(CALLS_PER_GRAPH):
        slots = (torch.arange(assignments, device="cuda") + i * assignments) % experts
        if one_active:
            slots = torch.where(torch.arange(assignments, device="cuda") == i % assignments, slots, -1)
        slots = slots.to(torch.int32)

        def call(slots=slots):
            _expert_gemv_kernel[(assignments, triton.cdiv(n, block_n))](
                x, w, slots, out, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                n, k, 1 if swiglu else top_k,
                SWIGLU=swiglu, DENSE=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        calls.append(call)
    distinct = 1 if one_active else min(assignments, experts)
    return calls, distinct * n * k * 2


def dense_calls(n, k, tokens, fn):
    copies = max(1, (200 << 20) // (n * k * 2))  # rotate through enough copies to miss L2
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda")
    return [lambda w=ws[i % copies]: fn(x, w) for i in range(CALLS_PER_GRAPH)], n * k * 2


def dense_tile(x, w, tile):
    n, k = w.shape
    block_n, block_k, warps, stages = tile
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _expert_gemv_kernel[(1, triton.cdiv(n, block_n))](
        x, w, x, out, x.stride(0), 0, w.stride(0), out.stride(0), n, k, 1,
        SWIGLU=False, DENSE=True, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def one_active_sweep() -> None:
    """The 5 best tiles and the tile in use (expert_gemv._TILES) per expert shape, one row of 8 computed."""
    from moetier.kernels.expert_gemv import _TILES

    for name, shape in EXPERT_SHAPES.items():
        results = []
        for tile in tile_grid(block_ns=(1, 2, 4, 8)):
            calls, nbytes = expert_calls(shape, 1, *tile, one_active=True)
            results.append((graph_time_s(calls), tile, nbytes))
        for t, tile, nbytes in sorted(results)[:5] + [r for r in results if r[1] == _TILES[shape[3]]]:
            print(json.dumps({"kernel": "expert_gemv", "shape": name, "one_active": True, "tile": tile,
                              "us": round(t * 1e6, 2), "gbps": round(nbytes / t / 1e9, 1)}), flush=True)


# (BLOCK_N, BLOCK_K, warps, stages) compared at every decode use, by whether the input is a [gate | up] pair
COMPARED_TILES = {
    False: [(8, 256, 4, 1), (4, 1024, 8, 1), (4, 1024, 4, 3), (4, 1024, 4, 1), (8, 512, 8, 3), (2, 1024, 4, 1),
            (2, 1024, 8, 1)],
    True: [(4, 256, 2, 3), (8, 1024, 8, 3), (8, 256, 4, 3), (8, 256, 4, 1), (4, 1024, 8, 3), (4, 512, 4, 3)],
}


def compare_tiles() -> None:
    """Microseconds per call of each compared tile at batch 1 and 8 (every row computed) and one active row."""
    for name, shape in EXPERT_SHAPES.items():
        for tile in COMPARED_TILES[shape[3]]:
            row = {"kernel": "expert_gemv", "shape": name, "tile": tile}
            for label, tokens, one_active in (("b1", 1, False), ("b8", 8, False), ("one_active", 1, True)):
                calls, _ = expert_calls(shape, tokens, *tile, one_active=one_active)
                row[label + "_us"] = round(graph_time_s(calls) * 1e6, 2)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


def main() -> None:
    if "--one-active" in sys.argv:
        one_active_sweep()
        return
    if "--compare" in sys.argv:
        compare_tiles()
        return
    dense_only = "--dense" in sys.argv
    for tokens in (1, 8):
        for name, (n, k) in DENSE_SHAPES.items():
            kernels = [("cublas", F.linear), ("dense_gemv", dense_gemv)]
            kernels += [(f"dense_tile_{tile}", functools.partial(dense_tile, tile=tile)) for tile in DENSE_TILES]
            for kernel, fn in kernels[: 1 if tokens > 1 else None]:
                calls, nbytes = dense_calls(n, k, tokens, fn)
                t = graph_time_s(calls)
                print(json.dumps({"kernel": kernel, "shape": name, "tokens": tokens, "us": round(t * 1e6, 2),
                                  "gbps": round(nbytes / t / 1e9, 1)}), flush=True)
        for name, shape in EXPERT_SHAPES.items():
            if dense_only:
                continue
            results = []
            for tile in tile_grid():
                calls, nbytes = expert_calls(shape, tokens, *tile)
                t = graph_time_s(calls)
                results.append((t, tile, nbytes))
            results.sort()
            for t, tile, nbytes in results[:5] + [r for r in results if r[1] == (16, 256, 4, 3)]:
                print(json.dumps({"kernel": "expert_gemv", "shape": name, "tokens": tokens, "tile": tile,
                                  "us": round(t * 1e6, 2), "gbps": round(nbytes / t / 1e9, 1)}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
