"""The memory planner: from a ModelSpec and a GPU byte budget, how many expert slots fit.

Pure arithmetic over the spec (no model is built, no weights are read), mirroring what the engine
allocates on the device:

  non-expert weights  every nn.Parameter of CausalLM (embedding, lm_head unless tied, attention of
                      each family incl. MLA, norms, routers, shared experts, dense layers); the token
                      embedding may instead stay on the host (as llama.cpp does), which the engine
                      does not do yet, so it is a planner option only
  KV cache            KVCache: (blocks for max_num_seqs x max_model_len, plus one scratch block) x
                      block_size x the attention's per-token shapes, in the model dtype
  reserve             RESERVE_BYTES plus the activations of the largest step (activation_bytes)
                      for what the weights and KV cache do not account for: the CUDA
                      context, kernel workspaces, CUDA-graph pools, activations, the slot tables
  expert slots        ExpertLayout.slot_bytes each, as many as fit in what is left

Every routed expert fitting means resident (no offloading). The host store of an offloaded model
is counted as the HostArena will reserve it (whole power-of-two chunks).
"""

import math
import re
from dataclasses import asdict, dataclass

import torch

from moetier.errors import MoetierError
from moetier.models.spec import AttentionSpec, ModelSpec
from moetier.moe.experts import ExpertLayout
from moetier.offload.arena import DEFAULT_ALIGNMENT
from moetier.offload.store import chunk_bytes_for, staging_arena_bytes

GIB = 1 << 30
# What NVML counts for the process beyond torch's allocator: the CUDA context and loaded kernels
# (measured 0.75 GiB on the device H100 with every kernel of a run loaded).
CONTEXT_BYTES = 3 * GIB // 4
# That, plus workspaces, CUDA-graph pools and the allocator's cached-but-free blocks; the activations
# of the largest step come on top (activation_bytes). Measured on the device H100 under the capped
# allocator: Qwen3-30B-A3B at 12 GiB holds 0.33 GiB beyond its planned weights, KV cache and slots
# once loaded (graph pools, workspaces) and up to 0.15 GiB of cached-but-free blocks; 1.375 GiB
# left its replayed-routing bench a few MiB from the cap (one run out of memory, one within 4 MB).
RESERVE_BYTES = 3 * GIB // 2
# Assumed bandwidths when no calibration profile exists: an H100 (HBM3) on PCIe 5.0 x16, pinned copies.
ASSUMED_DEVICE_GBPS = 3000.0
ASSUMED_H2D_PINNED_GBPS = 52.0

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string like "24GiB", "40GB" (decimal), "512MiB", "1.5G" (binary), "1000"."""
    if isinstance(value, bool):
        raise MoetierError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        nbytes = value
    else:
        match = _SIZE.match(str(value))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise MoetierError(f"not a memory size: {value!r} (use e.g. 24GiB, 40GB, 512MiB or a byte count)")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes < 1:
        raise MoetierError(f"a memory size must be positive, got {value!r}")
    return nbytes


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


# --- what the engine allocates, from the spec alone ------------------------------------------------

def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _attention_params(a: AttentionSpec, hidden: int) -> int:
    """Parameters of one GQAAttention / MLAAttention block (as in models/attention.py, models/mla.py)."""
    if a.kind == "mla":
        h, n, p, v, r = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank is None:
            q = _linear(hidden, h * (n + p), False)
        else:
            q = _linear(hidden, a.q_lora_rank, a.qkv_bias) + a.q_lora_rank + _linear(a.q_lora_rank, h * (n + p), False)
        return q + _linear(hidden, r + p, a.qkv_bias) + r + _linear(r, h * (n + v), False) + _linear(h * v, hidden, a.o_bias)
    h, k, d = a.num_heads, a.num_kv_heads, a.head_dim
    total = _linear(hidden, h * d, a.qkv_bias) + 2 * _linear(hidden, k * d, a.qkv_bias) + _linear(h * d, hidden, a.o_bias)
    if a.qk_norm == "head":
        total += 2 * d
    elif a.qk_norm == "full":
        total += h * d + k * d
    if a.sinks:
        total += h
    return total


def non_expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of every device-resident weight except the routed experts, by part."""
    item, d = dtype.itemsize, spec.hidden_size
    moe, router = spec.moe, spec.moe.router
    num_moe = len(spec.moe_layer_ids)
    num_dense = spec.num_layers - num_moe
    router_bytes = (moe.num_experts * d + (moe.num_experts if router.bias else 0)) * item
    router_bytes += moe.num_experts * 4 if router.correction_bias else 0  # kept in fp32
    shared = 3 * d * moe.shared_intermediate_size + (d if moe.shared_gate else 0)
    return {
        "embedding": spec.vocab_size * d * item,
        "lm_head": 0 if spec.tie_word_embeddings else spec.vocab_size * d * item,
        "attention": spec.num_layers * _attention_params(spec.attention, d) * item,
        "norms": (2 * spec.num_layers + 1) * d * item,
        "routers": num_moe * router_bytes,
        "shared_experts": num_moe * shared * item,
        "dense_mlp": num_dense * 3 * d * spec.dense_intermediate_size * item,
    }


def kv_cache_token_shapes(spec: ModelSpec) -> list[tuple[tuple[int, ...], ...]]:
    """What CausalLM.kv_cache_token_shapes() returns, without building the model."""
    a = spec.attention
    if a.kind == "mla":
        return [((a.kv_lora_rank + a.qk_rope_head_dim,),)] * spec.num_layers
    return [((a.num_kv_heads, a.head_dim),) * 2] * spec.num_layers


def num_kv_blocks(max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """The sequences' blocks (as config.resolve computes them), without the scratch block."""
    return -(-max_model_len // block_size) * max_num_seqs


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for layer in kv_cache_token_shapes(spec) for shape in layer) * dtype.itemsize


def activation_bytes(spec: ModelSpec, dtype: torch.dtype, max_num_batched_tokens: int) -> int:
    """A bound on a step's live activations: per token, its K expert rows through the grouped experts
    (gathered input, gate/up output, activation, down output, and the [T*K, D] rows they are scattered
    back into before the weighted sum) and a few hidden-sized buffers of the attention and norms."""
    hidden, ffn, top_k = spec.hidden_size, spec.moe.intermediate_size, spec.moe.top_k
    per_token = top_k * (3 * hidden + 3 * ffn) + 8 * hidden
    return max_num_batched_tokens * per_token * dtype.itemsize


def kv_cache_bytes(spec: ModelSpec, dtype: torch.dtype, max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """The KVCache the engine allocates: its blocks plus the CUDA-graph scratch block."""
    blocks = num_kv_blocks(max_model_len, max_num_seqs, block_size) + 1
    return blocks * block_size * kv_bytes_per_token(spec, dtype)


def expert_layout(spec: ModelSpec, dtype: torch.dtype) -> ExpertLayout:
    return ExpertLayout(spec.hidden_size, spec.moe.intermediate_size, dtype, spec.moe.expert_bias)


def host_arena_bytes(layout: ExpertLayout, count: int) -> int:
    """What the HostArena of an ExpertStore of `count` experts reserves (whole chunks; conservative by
    one alignment per chunk, since a chunk's base address may not be aligned)."""
    chunk = chunk_bytes_for(layout, count)
    per_chunk = (chunk - DEFAULT_ALIGNMENT) // layout.slot_bytes
    if per_chunk < 1:  # the arena gives an expert bigger than a chunk a chunk of its own
        return count * (1 << (layout.slot_bytes + DEFAULT_ALIGNMENT - 1).bit_length())
    return -(-count // per_chunk) * chunk


# --- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    gpu_budget: int
    cpu_budget: int | None
    reserve: int
    weights: dict[str, int]  # non-expert weights on the device, by part
    host_weights: dict[str, int]  # non-expert weights kept on the host (the embedding, if asked)
    kv_cache: int
    slot_bytes: int
    num_experts: int  # routed experts of every MoE layer
    num_slots: int  # device expert slots (== num_experts when resident)
    resident: bool
    host_store: int  # host bytes for the experts (the arena's reservation); 0 when resident
    top_k: int
    expert_slots_given: bool = False
    host_experts: int | None = None  # experts in the host arena when --cpu-memory caps it; the rest on disk

    @property
    def non_expert(self) -> int:
        return sum(self.weights.values())

    @property
    def experts_on_device(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def gpu_total(self) -> int:
        return self.reserve + self.non_expert + self.kv_cache + self.experts_on_device

    @property
    def cached_fraction(self) -> float:
        return min(1.0, self.num_slots / self.num_experts) if self.num_experts else 1.0

    @property
    def expert_slots(self) -> int | None:
        """What the engine's expert_slots becomes: None for resident."""
        return None if self.resident else self.num_slots

    def to_dict(self) -> dict:
        out = asdict(self)
        out |= {"non_expert": self.non_expert, "experts_on_device": self.experts_on_device,
                "gpu_total": self.gpu_total, "cached_fraction": self.cached_fraction}
        return out


def plan_memory(
    spec: ModelSpec,
    dtype: torch.dtype,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    gpu_budget: str | int,
    cpu_budget: str | int | None = None,
    reserve: int | None = None,
    embedding_on_host: bool = False,
    expert_slots: int | None = None,
    max_num_batched_tokens: int = 2048,
) -> MemoryPlan:
    """The memory plan for a GPU budget; expert_slots given: checks that many slots fit instead of
    choosing. Raises MoetierError when the non-expert part alone, or fewer than top_k slots, fit.
    The reserve defaults to RESERVE_BYTES plus the activations of a max_num_batched_tokens step."""
    gpu = parse_size(gpu_budget)
    if reserve is None:
        reserve = RESERVE_BYTES + activation_bytes(spec, dtype, max_num_batched_tokens)
    cpu = None if cpu_budget is None else parse_size(cpu_budget)
    weights = non_expert_bytes(spec, dtype)
    host_weights = {}
    if embedding_on_host:
        host_weights["embedding"] = weights.pop("embedding")
        if spec.tie_word_embeddings:  # the lm_head still reads the whole table on the device
            weights["lm_head"] = host_weights["embedding"]
    kv = kv_cache_bytes(spec, dtype, max_model_len, max_num_seqs, block_size)
    fixed = reserve + sum(weights.values()) + kv
    layout = expert_layout(spec, dtype)
    total = len(spec.moe_layer_ids) * spec.moe.num_experts
    top_k = spec.moe.top_k
    if fixed > gpu:
        raise MoetierError(
            f"the model needs {gib(fixed)} beyond the experts (weights {gib(sum(weights.values()))}, "
            f"KV cache {gib(kv)} for {max_num_seqs} x {max_model_len} tokens, reserve {gib(reserve)}); "
            f"the GPU budget is {gib(gpu)} (lower --max-model-len / --max-num-seqs, or raise --gpu-memory)"
        )
    fit = (gpu - fixed) // layout.slot_bytes
    if expert_slots is not None:
        if expert_slots > fit:
            raise MoetierError(
                f"{expert_slots} expert slots need {gib(expert_slots * layout.slot_bytes)} but only "
                f"{gib(gpu - fixed)} of the {gib(gpu)} GPU budget is left beside the other {gib(fixed)} "
                f"(at most {fit} slots of {layout.slot_bytes} bytes fit)"
            )
        slots, resident = expert_slots, False
    elif fit >= total:
        slots, resident = total, True
    else:
        slots, resident = fit, False
    if not resident and expert_slots is None and slots < top_k:
        raise MoetierError(
            f"only {slots} expert slots ({layout.slot_bytes} bytes each) fit in the {gib(gpu - fixed)} "
            f"left of the {gib(gpu)} GPU budget, fewer than the {top_k} experts a token uses; "
            f"needs at least {gib(fixed + top_k * layout.slot_bytes)}"
        )
    host_store = 0 if resident else host_arena_bytes(layout, total)
    host_experts = None
    if cpu is not None and host_store > cpu:  # the experts beyond the cap are served from disk
        staging = staging_arena_bytes(layout)  # the pinned ring disk reads land in
        if cpu < staging:
            raise MoetierError(
                f"the {gib(cpu)} host memory cap is below the {gib(staging)} pinned staging ring that experts "
                f"served from disk need; give --cpu-memory at least {gib(staging)}"
            )
        host_experts = max_host_experts(layout, total, cpu - staging)
        host_store = (host_arena_bytes(layout, host_experts) if host_experts else 0) + staging
    return MemoryPlan(gpu, cpu, reserve, weights, host_weights, kv, layout.slot_bytes, total, slots, resident,
                      host_store, top_k, expert_slots is not None, host_experts)


def max_host_experts(layout: ExpertLayout, total: int, cpu_budget: int) -> int:
    """The most experts whose host arena fits in cpu_budget (the arena's reservation grows in steps)."""
    low, high = 0, total
    while low < high:
        mid = (low + high + 1) // 2
        if host_arena_bytes(layout, mid) <= cpu_budget:
            low = mid
        else:
            high = mid - 1
    return low


# --- the decode roofline (`moetier fit`) -------------------------------------------------------------

def bandwidths(profile: dict | None) -> dict:
    """Device and pinned host-to-device bandwidths (GB/s) from a calibration profile, else assumed."""
    profile = profile or {}
    device, h2d = profile.get("device_copy_gbps"), profile.get("h2d_pinned_gbps")
    return {
        "device_gbps": device or ASSUMED_DEVICE_GBPS,
        "h2d_pinned_gbps": h2d or ASSUMED_H2D_PINNED_GBPS,
        "source": "calibration profile" if device and h2d else
        f"assumed (H100 PCIe 5.0: {ASSUMED_DEVICE_GBPS:g} GB/s HBM, {ASSUMED_H2D_PINNED_GBPS:g} GB/s pinned)",
    }


def decode_roofline(spec: ModelSpec, dtype: torch.dtype, plan: MemoryPlan, device_gbps: float, h2d_gbps: float,
                    context_tokens: int = 512, miss_rate: float | None = None) -> dict:
    """Batch-1 decode bounds: device bytes per token (non-expert weights but one embedding row, the
    top_k experts of every MoE layer, the KV cache of `context_tokens`) over the device bandwidth; and,
    offloaded, the miss bytes per token (uses x miss rate x expert slot bytes; the miss rate is
    1 - cached fraction under uniform routing unless given) over the pinned host-to-device bandwidth,
    copies overlapping compute at best."""
    layout = expert_layout(spec, dtype)
    expert_bytes = sum(math.prod(s) for s in layout.part_shapes.values()) * dtype.itemsize
    uses = len(spec.moe_layer_ids) * spec.moe.top_k
    weights = non_expert_bytes(spec, dtype)
    dense = sum(weights.values()) - weights["embedding"] + spec.hidden_size * dtype.itemsize
    if spec.tie_word_embeddings:
        dense += weights["embedding"]
    device_bytes = dense + uses * expert_bytes + context_tokens * kv_bytes_per_token(spec, dtype)
    resident_s = device_bytes / (device_gbps * 1e9)
    miss_bytes = uses * (1 - plan.cached_fraction if miss_rate is None else miss_rate) * layout.slot_bytes
    copy_s = miss_bytes / (h2d_gbps * 1e9)
    return {
        "device_bytes_per_token": int(device_bytes),
        "resident_tok_s": round(1 / resident_s, 1),
        "miss_bytes_per_token": int(miss_bytes),
        "copy_bound_tok_s": round(1 / copy_s, 1) if copy_s else None,
        "offloaded_tok_s": round(1 / max(resident_s, copy_s), 1),
        "context_tokens": context_tokens,
    }
