"""Replayed routing: drive a model's MoE layers from a trace (recorded or synthetic) instead of
its router, so dummy-weight benchmarks of a real shape see realistic routing.

The trace's tokens are consumed in order, cycling, T per forward (T = the step's token rows); the
read position is a device tensor advanced in the forward, so replay also runs inside CUDA graphs.
The router still runs (its cost is part of a real step); only its decision is replaced.
Legend: T tokens, K experts per token, N trace tokens, L MoE layers.
"""

import torch

from moetier.errors import MoetierError
from moetier.kernels import replay_rows
from moetier.moe.layer import MoELayer
from moetier.moe.router import Routing
from moetier.trace.format import RoutingTrace, require_routing_shape


class ReplayedRouting:
    def __init__(self, trace: RoutingTrace, moe_layers: tuple[int, ...], num_experts: int, top_k: int,
                 device: torch.device):
        require_routing_shape(trace, (len(moe_layers), num_experts, top_k), trace.model_id)
        self.position_of = {layer: i for i, layer in enumerate(moe_layers)}
        self.last_layer = moe_layers[-1]
        # Kept in the trace's own narrow dtypes (uint8/int16 ids, fp16 weights) and widened per step:
        # a 17k-token Qwen3-30B-A3B trace is 20 MB on the device this way, 78 MB widened.
        self.ids_LNK = torch.from_numpy(trace.expert_ids).to(device)
        self.weights_LNK = torch.from_numpy(trace.weights).to(device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=device)  # next trace token to replay

    def __call__(self, layer: int, routing: Routing) -> Routing:
        num_tokens = routing.topk_ids_TK.shape[0]
        i = self.position_of[layer]
        if replay_rows.supported(self.ids_LNK):
            replayed = Routing(*replay_rows.replay_rows(self.ids_LNK[i], self.weights_LNK[i], self.cursor, num_tokens))
        else:
            rows_T = (self.cursor + torch.arange(num_tokens, device=self.cursor.device)) % self.ids_LNK.shape[1]
            replayed = Routing(self.ids_LNK[i, rows_T].long(), self.weights_LNK[i, rows_T].float())
        if layer == self.last_layer:
            self.cursor.add_(num_tokens)  # in place: a captured graph advances it on every replay
        return replayed


def replay_routing(engine, trace: RoutingTrace) -> ReplayedRouting:
    """Installs the trace as every MoE layer's routing (decode graphs are captured again with it)."""
    spec = engine.source.spec
    source = ReplayedRouting(trace, spec.moe_layer_ids, spec.moe.num_experts, spec.moe.top_k, engine.resolved.device)
    for module in engine.model.modules():
        if isinstance(module, MoELayer):
            module.routing_override = source
    engine.runner.recapture_graphs()
    return source


def routing_trace_for(engine, routing: str) -> RoutingTrace:
    """`replay:FILE` (a recorded or synthesized trace) or `synthetic:KIND` (seeded, the model's shape)."""
    from moetier.trace.format import load_trace
    from moetier.trace.synthetic import KINDS, generate

    kind, _, argument = routing.partition(":")
    if kind == "replay" and argument:
        return load_trace(argument)
    if kind == "synthetic" and argument in KINDS:
        spec = engine.source.spec
        return generate(argument, len(spec.moe_layer_ids), spec.moe.num_experts, spec.moe.top_k, num_tokens=8192)
    raise MoetierError(f"--routing {routing!r}: use router, replay:FILE or synthetic:{{{','.join(KINDS)}}}")
