"""Host time of the offloaded executor's slot planning: the runtime's SlotPlanner and eviction policy
replayed over the donor traces (benchmarks/results/traces/donor-*), per needed expert, as JSON.

    python benchmarks/planner_speed.py [--policies layer,static,lru] [--repeats 3]

Each offloaded MoE layer step runs this planning on the host between reading its routing and issuing
its copies, so at decode it is part of the serial time the copy engine waits through. The budgets are
the offloading benchmark's: OLMoE-1B-7B at 4 GiB (69 slots), Qwen3-30B-A3B at 12 GiB (797),
Mixtral-8x7B at 24 GiB (56). Hit rates are printed too: a faster planner must not change them.
"""

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from moetier.trace.format import load_trace
from moetier.trace.simulate import access_events, simulate

TRACES = Path(__file__).resolve().parent / "results" / "traces"
CASES = (("olmoe-1b-7b", 69), ("qwen3-30b-a3b", 797), ("mixtral-8x7b", 56))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default="layer,static,lru")
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many replays is reported")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rows = []
    for shape, slots in CASES:
        trace = load_trace(TRACES / f"donor-{shape}" / "heldout.npz")
        events = access_events(trace)
        needed = sum(len(experts) for _, experts in events)
        for policy in args.policies.split(","):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                hits, misses = simulate(trace, policy, slots, events)
                best = min(best, time.perf_counter() - start)
            rows.append({"shape": shape, "slots": slots, "policy": policy, "layer_steps": len(events),
                         "us_per_needed_expert": round(best / needed * 1e6, 2),
                         "us_per_layer_step": round(best / len(events) * 1e6, 1),
                         "hit_rate": round(hits / (hits + misses), 4)})
    print(json.dumps({"benchmark": "planner_speed", "commit": commit, "python": platform.python_version(),
                      "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
