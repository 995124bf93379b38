"""MoELayer: the one place where router, expert executor and shared experts meet."""

from collections.abc import Callable

import torch

from moetier.models.mlp import DenseMLP
from moetier.models.spec import MoESpec
from moetier.moe.executor import ExpertExecutor
from moetier.moe.router import Router, Routing

# Called with (layer, routing) after routing, before the experts run; it must only enqueue device
# work (no host sync) so it also works under CUDA graph capture and replay.
RoutingObserver = Callable[[int, Routing], None]


class MoELayer(torch.nn.Module):
    def __init__(self, layer: int, spec: MoESpec, hidden_size: int, executor: ExpertExecutor):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.executor = executor
        self.gate = Router(spec.router, hidden_size)
        self.observer: RoutingObserver | None = None  # e.g. the trace recorder
        # Replaces the router's decision (the router still runs), e.g. replayed trace routing.
        self.routing_override: Callable[[int, Routing], Routing] | None = None
        if spec.shared_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, spec.shared_intermediate_size)
        if spec.shared_gate:
            self.shared_expert_gate = torch.nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x_TD)
        if self.routing_override is not None:
            routing = self.routing_override(self.layer, routing)
        if self.observer is not None:
            self.observer(self.layer, routing)
        y_TD = self.executor.run(self.layer, x_TD, routing)
        if self.spec.shared_intermediate_size:
            shared_TD = self.shared_expert(x_TD)
            if self.spec.shared_gate:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD
