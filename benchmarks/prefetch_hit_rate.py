"""The run's hit rate with prefetching against static pinning on the same routing, on CPU from the repo alone.

    PYTHONPATH=. python benchmarks/prefetch_hit_rate.py [--shapes mixtral,olmoe,qwen3] [--output-len 128]

`moetier bench`'s step mix (a 512-token prefill, then decode of 512-token prompts at batch 1 and 8, as the
device's final rows) on a tiny config of each shape (its MoE layers, experts and top_k; hidden size 64,
benchmarks/policy_eval.py), offloaded into the slot count of the device's uniform row (Mixtral-8x7B at
24 GiB 55, OLMoE-1B-7B at 4 GiB 53, Qwen3-30B-A3B at 12 GiB 776), routing replayed from synthetic uniform
routing as `--routing synthetic:uniform` does. The executor runs as on the device (layer-aware eviction,
next-gate predictor), its prefetching on and off; the bench's own replay gives static pinning's and the
policy's hit rates on the routing the run saw (no prefetching, cold start). One JSON line per run: hit
rates of the whole run and per phase, prefetches started and used.

What the device cannot show on CPU: how many guesses its copy window admits (here copies take no time,
so the window admits every guess that has a slot).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from policy_eval import tiny_config

from moetier.bench import measure_decode, measure_prefill, offload_summary
from moetier.llm import LLM
from moetier.trace.recorder import attach_recorder
from moetier.trace.replay import replay_routing, routing_trace_for

SHAPES = {"mixtral": ("mixtral-8x7b", 55), "olmoe": ("olmoe-1b-7b", 53), "qwen3": ("qwen3-30b-a3b", 776)}
PROMPT, BATCHES = 512, (1, 8)


def run(name: str, slots: int, output_len: int, prefetch: bool) -> dict:
    config = tiny_config(name)
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        llm = LLM(model_dir, load_format="dummy", dtype="float32", device="cpu", max_num_seqs=max(BATCHES),
                  expert_slots=slots, max_model_len=PROMPT + output_len + 1, max_num_batched_tokens=2048)
        replay_routing(llm.engine, routing_trace_for(llm.engine, "synthetic:uniform"))
        recorder = attach_recorder(llm.engine)
        executor = llm.engine.executor
        executor.prefetch_next_layer = prefetch

        def totals() -> tuple[int, ...]:
            stats = executor.stats()
            return stats["hits"], stats["misses"], stats["prefetch_loads"], stats["prefetch_used"]

        phases = {}
        for phase, measure in [("prefill", lambda: measure_prefill(llm, PROMPT, None))] + [
                (f"b{b}", lambda b=b: measure_decode(llm, b, PROMPT, output_len, None)) for b in BATCHES]:
            before = totals()
            measure()
            hits, misses, loads, used = (after - was for after, was in zip(totals(), before))
            phases[phase] = {"hit_rate": round(hits / (hits + misses), 4), "prefetch_loads": loads,
                             "prefetch_used": used}
        summary = offload_summary(llm.engine, recorder, None)
    return {"shape": name, "slots": slots, "prefetch": prefetch, "hit_rate": round(summary["hit_rate"], 4),
            "replayed_hit_rate": summary["replayed_hit_rate"], **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        name, slots = SHAPES[shape]
        for prefetch in (True, False):
            started = time.perf_counter()
            line = run(name, slots, args.output_len, prefetch)
            print(json.dumps(line | {"seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
