"""OffloadedExecutor: routed experts live in the host store; a pool of S GPU slots shared by all
MoE layers caches them. Same kernel, same dispatch and same k-ordered combine as ResidentExecutor,
so its outputs are bitwise identical.

Legend: T tokens, K experts per token, A = T*K assignments, D hidden, E experts, S slots.

Per MoE layer: one host sync reads the experts the step needs; hits use their slots; each miss
takes a free slot or the policy's victim (never an expert this layer needs), the copy into it
starts after the slot's last reader, and compute waits for the copies. If the layer needs more
experts than there are slots, it runs in rounds: each round computes its experts' assignment
rows into one [A, D] buffer, and one k-ordered sum follows, as in resident combine.
"""

from collections import Counter

import torch

from moetier.models.spec import ModelSpec
from moetier.moe.dispatch import Dispatch, combine, dispatch, group_by_slot, weighted_k_sum
from moetier.moe.executor import expert_kernels
from moetier.moe.experts import ExpertId, ExpertLayout, ExpertWeights
from moetier.moe.grouped import GEMV_MAX_TOKENS, gemv_experts
from moetier.moe.router import Routing
from moetier.offload.cache import EvictionPolicy, make_policy
from moetier.offload.copy_engine import CopyEngine, make_copy_engine
from moetier.offload.planner import SlotPlanner
from moetier.offload.slots import SlotPool
from moetier.offload.store import ExpertStore


class OffloadedExecutor:
    sync_free = False  # reads the routing on the host every MoE layer

    def __init__(self, model_spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, num_slots: int,
                 eviction: str | EvictionPolicy = "lru", copy_engine: CopyEngine | None = None,
                 host_experts: int | None = None):
        device = torch.device(device)
        self.spec = model_spec.moe
        self.layout = ExpertLayout(model_spec.hidden_size, self.spec.intermediate_size, dtype, self.spec.expert_bias)
        self.moe_layers = tuple(model_spec.moe_layer_ids)
        self.store = ExpertStore(self.layout, self.moe_layers, self.spec.num_experts, host_experts=host_experts)
        self.pool = SlotPool(num_slots, self.layout, self.moe_layers, self.spec.num_experts, device)
        policy = (
            eviction if isinstance(eviction, EvictionPolicy)
            else make_policy(eviction, num_slots, self.moe_layers, self.spec.num_experts, self.spec.top_k)
        )
        self.planner = SlotPlanner(num_slots, policy)
        self.copy_engine = copy_engine or make_copy_engine(device)
        self.kernel, self.gemv = expert_kernels(self.spec, dtype, device)
        self.hits: Counter[int] = Counter()
        self.misses: Counter[int] = Counter()
        self.bytes_copied = 0
        self.copy_wait_s = 0.0

    @property
    def expert_weights(self) -> ExpertWeights:
        return self.store

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        needed = torch.unique(routing.topk_ids_TK).tolist()  # the one host sync of the layer
        self.planner.access(layer, needed)
        round_experts = self._load_round(layer, needed)
        if len(round_experts) == len(needed):
            y_TD = self._compute_all(layer, x_TD, routing)
            self._mark_read(layer, needed)
            return y_TD
        out_AD = torch.empty(routing.topk_ids_TK.numel(), x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device)
        remaining = needed
        while True:
            self._compute_round(layer, x_TD, routing, round_experts, out_AD)
            self._mark_read(layer, round_experts)
            done = set(round_experts)
            remaining = [e for e in remaining if e not in done]
            if not remaining:
                return weighted_k_sum(out_AD, routing.topk_weights_TK)
            round_experts = self._load_round(layer, remaining)

    # --- planning and copies ----------------------------------------------------------------

    def _load_round(self, layer: int, experts: list[int]) -> list[int]:
        """Makes as many of `experts` resident as fit beside the hits; returns them (sorted)."""
        hits, loads = self.planner.plan_round(layer, experts)
        for e, slot, evicted in loads:
            expert = ExpertId(layer, e)
            filled = self.copy_engine.copy(self.pool.slot_bytes_S[slot], self.store.buffers[expert], self.pool.last_read[slot])
            self.pool.assign(slot, expert, evicted, filled)
            self.bytes_copied += self.layout.slot_bytes
        self.hits[layer] += len(hits)
        self.misses[layer] += len(loads)
        round_experts = sorted(hits + [e for e, _, _ in loads])
        self._wait_for_copies(layer, round_experts)
        return round_experts

    def _wait_for_copies(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            slot = self.planner.slot_of[ExpertId(layer, e)]
            if self.pool.filled[slot] is not None:
                self.copy_wait_s += self.copy_engine.wait(self.pool.filled[slot])
                self.pool.filled[slot] = None

    def _mark_read(self, layer: int, experts: list[int]) -> None:
        slots = [self.planner.slot_of[ExpertId(layer, e)] for e in experts]
        event = self.copy_engine.mark_read([self.pool.slot_bytes_S[s] for s in slots])
        for slot in slots:
            self.pool.last_read[slot] = event

    # --- compute: the resident kernels over the pool's bank -----------------------------------

    def _compute_all(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        bank, slot_of_expert_E = self.pool.bank, self.pool.device_table(layer)
        if self.gemv and x_TD.shape[0] <= GEMV_MAX_TOKENS:
            out_AD = gemv_experts(x_TD, slot_of_expert_E[routing.topk_ids_TK.reshape(-1)], bank)
            return weighted_k_sum(out_AD, routing.topk_weights_TK)
        plan = dispatch(x_TD, routing, bank.num_slots, slot_of_expert_E)
        return combine(self.kernel(plan, bank, self.spec), plan, routing)

    def _compute_round(self, layer: int, x_TD: torch.Tensor, routing: Routing, experts: list[int],
                       out_AD: torch.Tensor) -> None:
        """The assignments of `experts` through their slots, written to their rows of out_AD."""
        bank, slot_of_expert_E = self.pool.bank, self.pool.device_table(layer)
        ids_A = routing.topk_ids_TK.reshape(-1)
        rows_R = torch.isin(ids_A, torch.tensor(experts, device=ids_A.device)).nonzero().squeeze(1)  # ascending
        if self.gemv and x_TD.shape[0] <= GEMV_MAX_TOKENS:  # every row computed, only this round's kept
            out_AD[rows_R] = gemv_experts(x_TD, slot_of_expert_E[ids_A].clamp(min=0), bank)[rows_R]
            return
        top_k = routing.topk_ids_TK.shape[1]
        plan = Dispatch(*group_by_slot(x_TD, slot_of_expert_E[ids_A[rows_R]], rows_R, bank.num_slots, top_k))
        out_AD[plan.order_A] = self.kernel(plan, bank, self.spec)

    # --- stats ------------------------------------------------------------------------------

    def stats(self) -> dict:
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        return {
            "executor": "offloaded",
            "num_slots": self.pool.num_slots,
            "slot_bytes": self.layout.slot_bytes,
            "host_store_bytes": self.store.nbytes,
            "host_arena_reserved_bytes": self.store.arena.reserved_bytes,
            "disk_experts": self.store.disk_experts,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "bytes_copied": self.bytes_copied,
            "copy_wait_s": self.copy_wait_s,
            "layers": {layer: {"hits": self.hits[layer], "misses": self.misses[layer]} for layer in self.moe_layers},
        }
