"""Rounds per layer step by phase (b1: 1-token steps, b8: 2-16 tokens, pf: more) on the bench mixes:
planner rounds, the executor's compute rounds (first round split in hits + loads from OVERLAP_MIN_TOKENS
tokens: 128 before, 5 now), and the rounds' host syncs before this change (one per compute round on
the rounds path; now none). Runs where policy_sweep_eval.py runs (eval.py, harness.py, cache_orig.py)."""
import importlib.util, numpy as np
from eval import *
from moetier.offload.planner import SlotPlanner
import moetier.trace.simulate as S
spec = importlib.util.spec_from_file_location("cache_orig", "/tmp/pol/cache_orig.py")
orig = importlib.util.module_from_spec(spec); spec.loader.exec_module(orig)
EXTRA["old"] = lambda S_, layers, E, k: orig.LayerAware(layers)

def per_event(t, p, s, ev, width):
    planner = SlotPlanner(s, S.make_policy(p, s, tuple(t.moe_layers.tolist()), t.num_experts, t.top_k))
    out = []
    for (layer, needed), w in zip(ev, width):
        planner.access(layer, needed); remaining = needed; n = 0; split = False
        while remaining:
            h, loads = planner.plan_round(layer, remaining)
            if n == 0: split = bool(h and loads)
            n += 1
            done = set(h) | {e for e, _, _ in loads}; remaining = [e for e in remaining if e not in done]
        row = [n]
        for threshold in (128, 5):
            overlap = split and w >= threshold
            compute = n + overlap
            row += [compute, compute if (n > 1 or overlap) else 0]  # compute rounds, round syncs (old code)
        out.append(row)
    return np.array(out)

for shape in SHAPES:
    for routing in ("uniform", "donor"):
        t = bench_trace(shape, routing, 30); ev = access_events(t)
        s = 797 if (shape == "qwen3" and routing == "donor") else SHAPES[shape][1]
        L = len(t.moe_layers); u, c = np.unique(t.step, return_counts=True); width = np.repeat(c, L)
        for p in ("static", "old", "layer"):
            r = per_event(t, p, s, ev, width)
            cells = []
            for lo, hi, nm in ((1, 1, "b1"), (2, 16, "b8"), (17, 10**6, "pf")):
                m = r[(width >= lo) & (width <= hi)].mean(axis=0)
                cells.append(f"{nm}: plan {m[0]:.2f} compute@128 {m[1]:.2f} syncs@128 {m[2]:.2f} compute@5 {m[3]:.2f} syncs@5 {m[4]:.2f}")
            print(f"{shape} {routing} S={s} {p:6s}", " | ".join(cells), flush=True)
