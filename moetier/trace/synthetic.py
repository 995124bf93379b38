"""Seeded synthetic routing workloads, written as ordinary RoutingTraces (`moetier trace synth`).

Legend: L MoE layers, N tokens, K experts per token, E experts.

Every kind gives each token, per layer, K distinct experts drawn by popularity-weighted sampling
without replacement (successive draws, each in proportion to the weights of the experts not yet
drawn; implemented as the Gumbel top-k trick). Kinds and their parameters:
- `uniform`: every expert weight 1.
- `lognormal(sigma)`: per layer, weight_e = exp(sigma * z_e), z_e ~ N(0, 1) standardized over the
  E experts (mean 0, std exactly 1), so log-popularity has spread sigma (sigma 0: uniform).
- `markov(concentration, sigma)`: layer 0 as lognormal(sigma); for each consecutive layer pair a
  transition matrix T [E, E] whose row a is exp(concentration * z_ab) normalized (z ~ N(0, 1));
  the weights at layer l+1 are the mean of T's rows of the token's K experts at layer l.
  Concentration 0: no inter-layer affinity; larger: each expert predicts fewer next experts.
- `hotspot(hot_experts, hot_prob, period)`: per layer, a set of H = hot_experts experts receives
  hot_prob of the weight (the other E - H share the rest); every `period` tokens the set rotates
  to the next H experts of a per-layer random order.

Tokens form sequences of `seq_len` (positions 0, 1, ...), one token per engine step, all in the
decode phase (as batch-1 generation computes them), so `trace simulate` sees one token per step.
Routing weights: the chosen experts' sampling weights renormalized to sum to 1 (float16), in
descending order, matching the router's k order.

Fitting (`fit`) matches a donor trace's statistics by bisection on the generator itself (same
shape, same token count up to a cap, fixed seed), so top-k saturation and finite-sample noise are
accounted for:
- lognormal sigma: the load spread, the mean over layers of the standard deviation of log(load)
  (loads of experts never chosen clipped to half an assignment);
- markov concentration: the top-1 affinity mass (analyze.top_mass, m = 1) averaged over layer
  pairs; its sigma: the lognormal fit of the donor's first MoE layer.
"""

import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from moetier.errors import MoetierError
from moetier.trace.analyze import affinity, popularity, top_mass
from moetier.trace.format import DECODE, RoutingTrace, expert_id_dtype

KINDS: dict[str, dict] = {
    "uniform": {},
    "lognormal": {"sigma": 1.0},
    "markov": {"concentration": 2.0, "sigma": 0.0},
    "hotspot": {"hot_experts": None, "hot_prob": 0.8, "period": 256},
}
FITTABLE = ("uniform", "lognormal", "markov")
_FIT_MAX_TOKENS = 4096
_SIGMA_MAX = 6.0


def _choose(log_w_NE: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """K distinct experts per token by weighted sampling without replacement (Gumbel top-k).
    Returns ids [N, K] in descending weight order and those weights renormalized [N, K]."""
    keys = log_w_NE + rng.gumbel(size=log_w_NE.shape)
    ids = np.argpartition(-keys, k - 1, axis=1)[:, :k] if k < keys.shape[1] else np.argsort(-keys, axis=1)
    w = np.take_along_axis(log_w_NE, ids, axis=1)
    order = np.argsort(-w, axis=1, kind="stable")
    ids, w = np.take_along_axis(ids, order, axis=1), np.take_along_axis(w, order, axis=1)
    w = np.exp(w - w[:, :1])
    return ids, w / w.sum(axis=1, keepdims=True)


def _lognormal_log_w(rng, num_experts: int, sigma: float) -> np.ndarray:
    """sigma * z with z ~ N(0, 1) standardized over the E experts, so that the log-weights' spread is
    exactly sigma (a sample of E normals would add noise of order sigma / sqrt(2E) to it)."""
    z = rng.standard_normal(num_experts)
    if num_experts > 1:
        z = (z - z.mean()) / z.std()
    return sigma * z


def _check(kind: str, num_layers: int, num_experts: int, top_k: int, num_tokens: int, seq_len: int, params: dict):
    if kind not in KINDS:
        raise MoetierError(f"unknown synthetic kind {kind!r} (known: {', '.join(KINDS)})")
    unknown = sorted(set(params) - set(KINDS[kind]))
    if unknown:
        raise MoetierError(f"synthetic {kind}: unknown parameter {', '.join(unknown)}")
    if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts or num_tokens < 0 or seq_len < 1:
        raise MoetierError("synthetic: need layers >= 1, 1 <= top_k <= experts, tokens >= 0, seq_len >= 1")
    if num_experts > 32767:
        raise MoetierError("synthetic: at most 32767 experts (int16 ids)")


def generate(kind: str, num_layers: int, num_experts: int, top_k: int, num_tokens: int, seed: int = 0,
             seq_len: int = 256, expert_bytes: int = 0, moe_layers: np.ndarray | None = None,
             num_model_layers: int | None = None, **params) -> RoutingTrace:
    """A synthetic trace of the given kind (KINDS names each kind's parameters and defaults)."""
    _check(kind, num_layers, num_experts, top_k, num_tokens, seq_len, params)
    p = {**KINDS[kind], **params}
    L, E, K, N = num_layers, num_experts, top_k, num_tokens
    rng = np.random.default_rng(seed)
    ids = np.zeros((L, N, K), dtype=np.int64)
    weights = np.zeros((L, N, K), dtype=np.float64)

    if kind in ("uniform", "lognormal"):
        sigma = float(p.get("sigma", 0.0))
        if sigma < 0:
            raise MoetierError("synthetic lognormal: sigma must be >= 0")
        for layer in range(L):
            log_w = _lognormal_log_w(rng, E, sigma)
            ids[layer], weights[layer] = _choose(np.broadcast_to(log_w, (N, E)), K, rng)
    elif kind == "markov":
        c, sigma = float(p["concentration"]), float(p["sigma"])
        if c < 0 or sigma < 0:
            raise MoetierError("synthetic markov: concentration and sigma must be >= 0")
        log_w = _lognormal_log_w(rng, E, sigma)
        ids[0], weights[0] = _choose(np.broadcast_to(log_w, (N, E)), K, rng)
        for layer in range(1, L):
            t = np.exp(c * rng.standard_normal((E, E)))
            t /= t.sum(axis=1, keepdims=True)
            mix_NE = sum(t[ids[layer - 1, :, j]] for j in range(K)) / K
            ids[layer], weights[layer] = _choose(np.log(mix_NE), K, rng)
    elif kind == "hotspot":
        h = p["hot_experts"] if p["hot_experts"] is not None else max(K, E // 8)
        h, hot_prob, period = int(h), float(p["hot_prob"]), int(p["period"])
        if not 1 <= h <= E or not 0 <= hot_prob <= 1 or period < 1:
            raise MoetierError("synthetic hotspot: need 1 <= hot_experts <= experts, 0 <= hot_prob <= 1, period >= 1")
        cold = (1 - hot_prob) / (E - h) if E > h else 0.0
        windows = np.arange(N) // period
        for layer in range(L):
            perm = rng.permutation(E)
            hot_NE = np.zeros((N, E), dtype=bool)
            slots = (windows[:, None] * h + np.arange(h)[None, :]) % E
            np.put_along_axis(hot_NE, perm[slots], True, axis=1)
            with np.errstate(divide="ignore"):
                log_w = np.where(hot_NE, np.log(hot_prob / h) if hot_prob > 0 else -np.inf,
                                 np.log(cold) if cold > 0 else -np.inf)
            # zero-weight experts still fill the top-k when too few have weight: give them a tiny one
            log_w = np.where(np.isfinite(log_w), log_w, -1e3)
            ids[layer], weights[layer] = _choose(log_w, K, rng)

    shown = dict(p)
    positions = np.arange(N) % seq_len
    return RoutingTrace(
        model_id=f"synthetic:{kind}:{json.dumps(shown, sort_keys=True)}:seed={seed}",
        num_layers=int(num_model_layers if num_model_layers is not None else L),
        moe_layers=(np.arange(L) if moe_layers is None else np.asarray(moe_layers)).astype(np.int32),
        num_experts=E, top_k=K, expert_bytes=int(expert_bytes),
        seq_id=(np.arange(N) // seq_len).astype(np.int32), position=positions.astype(np.int32),
        phase=np.full(N, DECODE, np.uint8), step=np.arange(N, dtype=np.int32),
        expert_ids=ids.astype(expert_id_dtype(E)), weights=weights.astype(np.float16),
    ).validate()


def generate_like(kind: str, donor: RoutingTrace, num_tokens: int | None = None, seed: int = 0,
                  seq_len: int = 256, **params) -> RoutingTrace:
    """A synthetic trace with the donor's shape (MoE layers, experts, top-k, expert bytes)."""
    return generate(kind, len(donor.moe_layers), donor.num_experts, donor.top_k,
                    donor.num_tokens if num_tokens is None else num_tokens, seed=seed, seq_len=seq_len,
                    expert_bytes=donor.expert_bytes, moe_layers=donor.moe_layers,
                    num_model_layers=donor.num_layers, **params)


# --- fitting -------------------------------------------------------------------------------------

def load_spread(trace: RoutingTrace) -> float:
    """Mean over layers of std(log load); never-chosen experts count as half an assignment."""
    n = trace.num_tokens * trace.top_k
    if n == 0:
        raise MoetierError("fit: the trace has no tokens")
    spreads = []
    for i in range(len(trace.moe_layers)):
        load_E, _, _ = popularity(trace.expert_ids[i], trace.num_experts)
        spreads.append(float(np.log(np.maximum(load_E, 0.5 / n)).std()))
    return float(np.mean(spreads))


def affinity_mass(trace: RoutingTrace, m: int = 1) -> float:
    """The top-m affinity mass (analyze's definition) averaged over consecutive MoE-layer pairs."""
    if len(trace.moe_layers) < 2:
        raise MoetierError("fit markov: the trace needs at least two MoE layers")
    masses = []
    for i in range(len(trace.moe_layers) - 1):
        load_E, _, _ = popularity(trace.expert_ids[i], trace.num_experts)
        masses.append(top_mass(affinity(trace.expert_ids[i], trace.expert_ids[i + 1], trace.num_experts), load_E, m))
    return float(np.mean(masses))


def _bisect(stat: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 18) -> float:
    """x in [lo, hi] with stat(x) ~ target, stat increasing; clamps at the ends."""
    if stat(lo) >= target:
        return lo
    if stat(hi) <= target:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stat(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit(kind: str, donor: RoutingTrace, seed: int = 0, max_tokens: int = _FIT_MAX_TOKENS) -> dict:
    """Parameters of `kind` whose synthetic trace (the donor's shape and token count, up to
    max_tokens) matches the donor's statistics (see the module docstring)."""
    if kind not in FITTABLE:
        raise MoetierError(f"fit: kind {kind!r} has no fit (fittable: {', '.join(FITTABLE)})")
    if donor.num_tokens == 0:
        raise MoetierError("fit: the trace has no tokens")
    n = min(donor.num_tokens, max_tokens)
    if kind == "uniform":
        return {}
    if kind == "lognormal":
        target = load_spread(donor)
        # fewer donor tokens -> noisier loads: calibrate on the donor's token count (capped)
        if n < donor.num_tokens:
            target = load_spread(_head(donor, n))
        stat = lambda s: load_spread(generate_like("lognormal", donor, n, seed=seed, sigma=s))
        return {"sigma": round(_bisect(stat, target, 0.0, _SIGMA_MAX), 4)}
    first = _layers(_head(donor, n), [0])
    sigma = fit("lognormal", first, seed=seed, max_tokens=max_tokens)["sigma"]
    pair = _layers(_head(donor, n), [0, 1])
    target = affinity_mass(_head(donor, n))
    stat = lambda c: affinity_mass(generate_like("markov", pair, n, seed=seed, concentration=c, sigma=sigma))
    return {"concentration": round(_bisect(stat, target, 0.0, 8.0), 4), "sigma": sigma}


def _head(trace: RoutingTrace, n: int) -> RoutingTrace:
    if n >= trace.num_tokens:
        return trace
    return replace(trace, **{k: getattr(trace, k)[:n] for k in ("seq_id", "position", "phase", "step")},
                   expert_ids=trace.expert_ids[:, :n], weights=trace.weights[:, :n])


def _layers(trace: RoutingTrace, idx: list[int]) -> RoutingTrace:
    return replace(trace, moe_layers=trace.moe_layers[idx], expert_ids=trace.expert_ids[idx],
                   weights=trace.weights[idx])
