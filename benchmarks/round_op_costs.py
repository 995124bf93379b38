"""Host microseconds per call of the torch calls an offloaded round makes (moetier/moe/dispatch.py
dispatch_round, the grouped GEMM, the scatter), at a Qwen3-30B-A3B 512-token prefill's sizes, in four states
of the GPU: idle; busy on the same stream (a ~30 ms sleep kernel queued first); busy on another stream; the
same stream waiting for an event of a busy other stream (as compute waits for the expert copies). A call
that waited for the GPU would show the sleep (tens of ms). One JSON object: name -> [idle, same, other,
waiting]; `20_small_adds` is twenty tiny additions, for scale.

    python benchmarks/round_op_costs.py
"""

import json
import time

import torch
import torch.nn.functional as F

from moetier.moe.dispatch import dispatch_round
from moetier.moe.router import Routing

TOKENS, TOP_K, EXPERTS, SLOTS, HIDDEN, INTER = 512, 8, 128, 783, 2048, 768
REPS = 5
SLEEP_CYCLES = 50_000_000


def main() -> None:
    device = torch.device("cuda")
    other = torch.cuda.Stream(device)
    x_TD = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    ids_TK = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(TOKENS)]).to(device)
    routing = Routing(ids_TK, torch.rand(TOKENS, TOP_K, device=device))
    slots_E = torch.full((EXPERTS,), SLOTS, device=device, dtype=torch.int64)
    slots_E[:8] = torch.arange(8, device=device) * 3
    gate_up_SFD = torch.randn(SLOTS, 2 * INTER, HIDDEN, device=device, dtype=torch.bfloat16)
    out_A1D = torch.empty(TOKENS * TOP_K + 1, HIDDEN, device=device, dtype=torch.bfloat16)
    slots_A = slots_E[ids_TK.reshape(-1)]
    sorted_A, order_A = torch.sort(slots_A, stable=True)
    slot_ids = torch.arange(SLOTS, device=device)
    ends_S = torch.searchsorted(sorted_A, slot_ids, right=True, out_int32=True)
    x_sorted_AD = x_TD[order_A // TOP_K]
    rows_A = torch.where(sorted_A < SLOTS, order_A, TOKENS * TOP_K)

    def small_adds() -> torch.Tensor:
        a = torch.ones(16, device=device)
        for _ in range(20):
            a = a + 1
        return a

    calls = {
        "index": lambda: slots_E[ids_TK.reshape(-1)],
        "sort_stable": lambda: torch.sort(slots_A, stable=True),
        "searchsorted": lambda: torch.searchsorted(sorted_A, slot_ids, right=True, out_int32=True),
        "where": lambda: torch.where(sorted_A < SLOTS, order_A, TOKENS * TOP_K),
        "gather_x": lambda: x_TD[order_A // TOP_K],
        "grouped_mm": lambda: F.grouped_mm(x_sorted_AD, gate_up_SFD.transpose(-2, -1), offs=ends_S),
        "index_put": lambda: out_A1D.__setitem__(rows_A, x_sorted_AD),
        "dispatch_round": lambda: dispatch_round(x_TD, routing, SLOTS, slots_E),
        "20_small_adds": small_adds,
    }
    costs = {}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        costs[name] = []
        for state in ("idle", "same", "other", "waiting"):
            seconds = 0.0
            for _ in range(REPS):
                if state == "same":
                    torch.cuda._sleep(SLEEP_CYCLES)
                elif state in ("other", "waiting"):
                    with torch.cuda.stream(other):
                        torch.cuda._sleep(SLEEP_CYCLES)
                        busy = torch.cuda.Event()
                        busy.record(other)
                    if state == "waiting":
                        torch.cuda.current_stream(device).wait_event(busy)
                start = time.perf_counter()
                call()
                seconds += time.perf_counter() - start
                torch.cuda.synchronize()
            costs[name].append(round(seconds / REPS * 1e6, 1))
    print(json.dumps(costs))


if __name__ == "__main__":
    main()
