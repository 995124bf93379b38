"""Eviction policies on `moetier bench`'s step mix, on CPU, from the repo alone: hit rates (static pinning,
layer-aware, LRU), planner rounds per layer step and the rounds' serialized copies, as JSON lines.

    PYTHONPATH=. python benchmarks/policy_eval.py [--policies static,layer,lru] [--shapes olmoe,qwen3,mixtral]

Step mix: `moetier bench --prompt-len 512 --prefill-lens 512 --batch-sizes 1,8 --output-len N` (N = 64, 48,
16 as in benchmarks/device_offload.sh) run on CPU with a tiny config of each shape (its MoE layers, experts
and top_k; hidden size 64) and the routing recorded: only its steps are kept (which tokens share a step).
The routing is then replaced by the trained donor's (results/traces/donor-*/heldout.npz) or by synthetic
uniform routing (8192 tokens, seed 0), taken from token OFFSET on (the device runs' cursor after the
router's warm-up) and wrapping around. Slots: results/2026-11-22-h100-offload/README.md (OLMoE-1B-7B
58 at 4 GiB, Qwen3-30B-A3B 783 at 12 GiB, Mixtral-8x7B 56 at 24 GiB) and the session-3 counts
(69, 797) that results/2026-11-22-cpu-planner/policy_sweep_eval.txt used.

Per policy and phase (b1: 1-token steps, b8: 2-16 tokens, pf: more), per layer step: `rounds` planned by
the SlotPlanner; `serialized` copies, those whose slot was last read by the compute of the same layer
step that waits for the copies issued just before them (the copy engine idles through that compute),
and `gaps`, the rounds that begin with such a copy. `order` "ahead" plans rounds as the executor does
(SlotPlanner.plan_step: round r + 1 planned before round r computes, beside round r's loads, at most half
the first round's width); "serial" plans round r + 1 after round r computed, as large as fits (the
executor before 2026-11-22).
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moetier.bench import measure_decode, measure_prefill
from moetier.llm import LLM
from moetier.moe.experts import ExpertId
from moetier.offload.cache import make_policy
from moetier.offload.executor import OVERLAP_MIN_TOKENS
from moetier.offload.planner import SlotPlanner
from moetier.trace.format import RoutingTrace, load_trace
from moetier.trace.recorder import attach_recorder, engine_trace
from moetier.trace.simulate import access_events
from moetier.trace.synthetic import generate

BENCH = Path(__file__).resolve().parent
# shape -> (config and donor name, bench --output-len, slot counts)
SHAPES = {
    "olmoe": ("olmoe-1b-7b", 64, (58, 69)),
    "qwen3": ("qwen3-30b-a3b", 48, (783, 797)),
    "mixtral": ("mixtral-8x7b", 16, (56,)),
}
TINY = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "torch_dtype": "float32"}
PROMPT, MAX_BATCH, OFFSET = 512, 8, 30
PHASES = (("b1", 1, 1), ("b8", 2, 16), ("pf", 17, 1 << 30))


def tiny_config(name: str) -> dict:
    """The shape's config (its MoE layers, experts and top_k) with TINY's sizes."""
    config = json.loads((BENCH / "configs" / name / "config.json").read_text())
    config.update({k: v for k, v in TINY.items() if k in config or k == "head_dim"})
    return config


def bench_steps(name: str, output_len: int) -> RoutingTrace:
    """The routing trace of `moetier bench` on a tiny model of the shape (CPU, resident, dummy weights)."""
    config = tiny_config(name)
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        llm = LLM(model_dir, load_format="dummy", dtype="float32", device="cpu", max_num_seqs=MAX_BATCH,
                  max_model_len=PROMPT + output_len + 1, max_num_batched_tokens=2048)
        recorder = attach_recorder(llm.engine)
        measure_prefill(llm, PROMPT, None)  # run_bench's order: the prefill, then each batch size's decode
        for batch in (1, MAX_BATCH):
            measure_decode(llm, batch, PROMPT, output_len, None)
        return engine_trace(llm.engine, recorder)


def routed(steps: RoutingTrace, source: RoutingTrace) -> RoutingTrace:
    """`steps` with the routing of `source` from token OFFSET on."""
    rows = (OFFSET + np.arange(steps.num_tokens)) % source.num_tokens
    return replace(steps, moe_layers=source.moe_layers, num_layers=source.num_layers,
                   expert_ids=source.expert_ids[:, rows], weights=source.weights[:, rows])


def replay(trace: RoutingTrace, policy: str, slots: int, ahead: bool) -> dict:
    """The executor's rounds over the trace: hits, and per layer step its width (tokens), planner rounds,
    serialized copies and gaps."""
    layers = tuple(trace.moe_layers.tolist())
    planner = SlotPlanner(slots, make_policy(policy, slots, layers, trace.num_experts, trace.top_k))
    _, per_step = np.unique(trace.step, return_counts=True)
    hits = accesses = 0
    rows = []  # (width, rounds, serialized, gaps) per layer step
    for (layer, needed), width in zip(access_events(trace), np.repeat(per_step, len(layers))):
        planner.access(layer, needed)
        accesses += len(needed)
        waits_on: dict[int, int] = {}  # slot -> the copy round its last compute (this layer step) waited for
        rounds = serialized = gaps = 0
        for round_hits, loads in planner.plan_step(layer, needed) if ahead else serial_rounds(planner, layer, needed):
            late = sum(waits_on.get(slot) == rounds - 1 for _, slot, _ in loads)
            serialized, gaps = serialized + late, gaps + (late > 0)
            hits += len(round_hits)
            # The first round computes its hits apart (waiting for no copy) from OVERLAP_MIN_TOKENS tokens.
            split = rounds == 0 and round_hits and loads and width >= OVERLAP_MIN_TOKENS
            for e in [] if split else round_hits:
                waits_on[planner.slot_of[ExpertId(layer, e)]] = rounds
            for e, slot, _ in loads:
                waits_on[slot] = rounds
            rounds += 1
        rows.append((width, rounds, serialized, gaps))
    return {"hits": hits, "accesses": accesses, "rows": np.array(rows)}


def serial_rounds(planner: SlotPlanner, layer: int, needed: list[int]):
    """Rounds as the executor planned them before 2026-11-22: each after the one before computed, as large as fits."""
    remaining = needed
    while remaining:
        round_hits, loads = planner.plan_round(layer, remaining)
        yield round_hits, loads
        done = set(round_hits) | {e for e, _, _ in loads}
        remaining = [e for e in remaining if e not in done]


def report(shape: str, routing: str, slots: int, policy: str, order: str, result: dict) -> dict:
    rows = result["rows"]
    line = {"shape": shape, "routing": routing, "slots": slots, "policy": policy, "order": order,
            "hit_rate": round(result["hits"] / result["accesses"], 4)}
    for key, column in (("rounds", 1), ("serialized", 2), ("gaps", 3)):
        line[key] = {name: round(float(rows[(rows[:, 0] >= lo) & (rows[:, 0] <= hi), column].mean()), 2)
                     for name, lo, hi in PHASES}
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="static,layer,lru")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--orders", default="serial,ahead")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        name, output_len, slot_counts = SHAPES[shape]
        started = time.perf_counter()
        steps = bench_steps(name, output_len)
        donor = load_trace(BENCH / "results" / "traces" / f"donor-{name}" / "heldout.npz")
        uniform = generate("uniform", len(donor.moe_layers), donor.num_experts, donor.top_k, num_tokens=8192)
        for routing, source in (("uniform", uniform), ("donor", donor)):
            trace = routed(steps, source)
            for slots in slot_counts:
                for policy in args.policies.split(","):
                    for order in args.orders.split(","):
                        line = report(shape, routing, slots, policy, order, replay(trace, policy, slots, order == "ahead"))
                        print(json.dumps(line), flush=True)
        print(json.dumps({"shape": shape, "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
