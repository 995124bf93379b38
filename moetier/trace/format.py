"""The routing-trace file: one compressed .npz, every array named and typed as below.

Legend: L MoE layers, N tokens, K experts per token.

| key | dtype, shape | meaning |
|---|---|---|
| `format` | str | `"moetier-routing-trace"` |
| `version` | int64 scalar | `1` |
| `model_id` | str | the checkpoint the routing came from |
| `num_layers` | int64 scalar | decoder layers of the model (MoE or not) |
| `moe_layers` | int32 [L] | decoder-layer index of each MoE layer, ascending |
| `num_experts`, `top_k` | int64 scalar | routed experts per layer, experts per token |
| `expert_bytes` | int64 scalar | bytes of one packed routed expert (0: unknown); simulate's miss bytes |
| `seq_id` | int32 [N] | sequence of each token (0, 1, ... in order of first appearance) |
| `position` | int32 [N] | the token's position in its sequence |
| `phase` | uint8 [N] | 0 prefill (a prompt token), 1 decode (a generated token fed back) |
| `step` | int32 [N] | engine step that computed the token (tokens of one step share a forward) |
| `expert_ids` | uint8 [L, N, K] if num_experts <= 256, else int16 | top-k expert ids, in the router's k order |
| `weights` | float16 [L, N, K] | the routing weights of those experts |

Tokens are stored in the order they were computed (step by step, within a step in batch-row order).
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetier.errors import MoetierError

FORMAT, VERSION = "moetier-routing-trace", 1
PREFILL, DECODE = 0, 1
_SCALARS = ("num_layers", "num_experts", "top_k", "expert_bytes")
_TOKEN_FIELDS = {"seq_id": np.int32, "position": np.int32, "phase": np.uint8, "step": np.int32}


def expert_id_dtype(num_experts: int) -> type:
    return np.uint8 if num_experts <= 256 else np.int16


@dataclass
class RoutingTrace:
    model_id: str
    num_layers: int
    moe_layers: np.ndarray
    num_experts: int
    top_k: int
    expert_bytes: int
    seq_id: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    step: np.ndarray
    expert_ids: np.ndarray
    weights: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.seq_id)

    def validate(self) -> "RoutingTrace":
        """Raises MoetierError naming the first inconsistency."""
        L, N, K, E = len(self.moe_layers), self.num_tokens, self.top_k, self.num_experts
        if E < 1 or K < 1 or K > E:
            raise MoetierError(f"trace: need 1 <= top_k <= num_experts, got top_k={K}, num_experts={E}")
        if L < 1 or np.any(np.diff(self.moe_layers) <= 0) or self.moe_layers.min() < 0 \
                or self.moe_layers.max() >= self.num_layers:
            raise MoetierError("trace: moe_layers must be ascending layer indices in [0, num_layers)")
        for name, dtype in _TOKEN_FIELDS.items():
            array = getattr(self, name)
            if array.shape != (N,) or array.dtype != dtype:
                raise MoetierError(f"trace: {name} must be {np.dtype(dtype)} [{N}], got {array.dtype} {array.shape}")
        want_ids = np.dtype(expert_id_dtype(E))
        if self.expert_ids.shape != (L, N, K) or self.expert_ids.dtype != want_ids:
            raise MoetierError(f"trace: expert_ids must be {want_ids} [{L}, {N}, {K}], "
                               f"got {self.expert_ids.dtype} {self.expert_ids.shape}")
        if self.weights.shape != (L, N, K) or self.weights.dtype != np.float16:
            raise MoetierError(f"trace: weights must be float16 [{L}, {N}, {K}], got {self.weights.dtype} {self.weights.shape}")
        if N and (self.expert_ids.min() < 0 or self.expert_ids.max() >= E):
            raise MoetierError(f"trace: expert ids must lie in [0, {E})")
        if not np.isin(self.phase, (PREFILL, DECODE)).all():
            raise MoetierError("trace: phase must be 0 (prefill) or 1 (decode)")
        if N and (np.any(np.diff(self.step) < 0) or self.position.min() < 0 or self.seq_id.min() < 0):
            raise MoetierError("trace: steps must be non-decreasing, positions and sequence ids >= 0")
        return self

    def save(self, path: str | Path) -> None:
        self.validate()
        with open(path, "wb") as f:  # np.savez_compressed would append .npz to a str path without it
            np.savez_compressed(
                f, format=np.array(FORMAT), version=np.array(VERSION), model_id=np.array(self.model_id),
                moe_layers=self.moe_layers, **{k: np.array(getattr(self, k), dtype=np.int64) for k in _SCALARS},
                **{k: getattr(self, k) for k in _TOKEN_FIELDS}, expert_ids=self.expert_ids, weights=self.weights,
            )


def load_trace(path: str | Path) -> RoutingTrace:
    """Reads and validates a trace; a malformed file raises MoetierError saying what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise MoetierError(f"trace {path}: no such file") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # not a zip, truncated, pickled
        raise MoetierError(f"trace {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if arrays.get("format", np.array("")).item() != FORMAT:
        raise MoetierError(f"trace {path}: not a moetier routing trace (no format={FORMAT!r})")
    if int(arrays.get("version", -1)) != VERSION:
        raise MoetierError(f"trace {path}: version {arrays.get('version')} is not supported (expected {VERSION})")
    needed = {"model_id", "moe_layers", "expert_ids", "weights", *_SCALARS, *_TOKEN_FIELDS}
    missing = sorted(needed - set(arrays))
    if missing:
        raise MoetierError(f"trace {path}: missing {', '.join(missing)}")
    try:
        trace = RoutingTrace(
            model_id=str(arrays["model_id"].item()),
            moe_layers=arrays["moe_layers"].astype(np.int32).reshape(-1),
            **{k: int(arrays[k]) for k in _SCALARS},
            **{k: arrays[k] for k in _TOKEN_FIELDS},
            expert_ids=arrays["expert_ids"], weights=arrays["weights"],
        )
    except (TypeError, ValueError) as e:
        raise MoetierError(f"trace {path}: malformed header ({e})") from None
    try:
        return trace.validate()
    except MoetierError as e:
        raise MoetierError(f"{path}: {e}") from None


def require_routing_shape(trace: RoutingTrace, shape: tuple[int, int, int], source: str) -> None:
    """A trace replayed into, or simulated for, a model must have its routing shape (MoE layers,
    experts, top-k) and at least one token."""
    have = (len(trace.moe_layers), trace.num_experts, trace.top_k)
    if have != shape:
        raise MoetierError(
            f"routing trace {source} has {have[0]} MoE layers x {have[1]} experts, top-{have[2]}; the model has "
            f"{shape[0]} x {shape[1]}, top-{shape[2]}: it does not match the model's routing shape"
        )
    if trace.num_tokens == 0:
        raise MoetierError(f"routing trace {source} has no tokens")
