"""Predictors: which experts the next MoE layer will use, guessed before its router runs, so their
copies can fill the time the copy engine would otherwise idle (the attention, the router and the
routing read of that layer).

A predictor only enqueues device work; the executor brings its guess to the host with the current
layer's routing (in one copy and sync, or, in graphed decode, from the pinned memory the graph writes it
into after the routing), so a prediction costs no extra host sync. Predictions
move experts between tiers ahead of time and never change a computed value.

NextGatePredictor applies the next MoE layer's router weights to the current layer's input and
takes the top-k logits: the residual stream changes little from one layer to the next, so it
mostly picks the same experts (the cross-layer gating of Pre-gated MoE and AdapMoE). Two kernels;
the router's own scoring (softmax, groups, bias correction) is left out: a guess needs no more.
Routing that is replaced after the router (a replayed trace) makes its guesses wrong; the executor
measures their precision and stops prefetching while it is low.
Legend: T tokens, D hidden, K experts per token.
"""

from collections.abc import Mapping
from typing import Protocol

import torch

from moetier.kernels import router_topk
from moetier.models.linear import linear
from moetier.moe.layer import MoELayer
from moetier.moe.router import Router

PREDICTOR_NAMES = ("gate", "none")


class Predictor(Protocol):
    def predict(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor | None:
        """Device ids [T, K] of the experts the MoE layer after `layer` is expected to use (work
        enqueued, no host sync), or None where there is nothing to predict."""
        ...


class NextGatePredictor:
    def __init__(self, routers: Mapping[int, Router]):
        layers = sorted(routers)
        self.routers = routers
        self.next_layer = dict(zip(layers, layers[1:]))

    def predict(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor | None:
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return None
        router = self.routers[nxt]
        with torch.no_grad():
            logits_TE = linear(x_TD, router.weight)  # the router's own projection (at batch 1 the decode GEMV)
            if logits_TE.is_cuda and router_topk.triton is not None:
                # one launch where torch.topk takes two (~9 us of GPU time a layer on the H100, on the
                # path from the last expert copy to the next layer's routing read)
                return router_topk.softmax_topk(logits_TE, router.spec.top_k, False, False, 1.0)[0]
            return torch.topk(logits_TE, router.spec.top_k, dim=-1).indices


def make_predictor(name: str, model: torch.nn.Module) -> Predictor | None:
    """By name, over the routers of the model's MoE layers."""
    if name == "none":
        return None
    return NextGatePredictor({m.layer: m.gate for m in model.modules() if isinstance(m, MoELayer)})
