"""EngineConfig (what the user asked for) and its resolution (every "auto" decided here, logged once)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moetier.errors import MoetierError
from moetier.models.spec import ModelSpec
from moetier.offload.budget import MemoryPlan, gib, parse_size, plan_memory
from moetier.offload.cache import POLICY_NAMES
from moetier.offload.predict import PREDICTOR_NAMES

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
_AUTO_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint dir or Hub id in the local cache; None: the embedded default
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    load_format: str = "auto"  # auto | safetensors | dummy
    max_model_len: int | None = None  # None: min(model's max positions, 4096)
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    seed: int = 0
    cuda_graphs: bool = True  # capture decode steps (CUDA, GQA models); False: always eager
    expert_slots: int | None = None  # None: every expert resident; N: offload, a pool of N GPU expert slots
    eviction: str = "layer"  # with expert_slots: layer | lru | lfu | static
    predictor: str = "gate"  # with expert_slots: gate (next layer's router on this layer's input) | none
    gpu_memory: str | int | None = None  # "24GiB", "40GB", bytes: plan expert slots for this device budget
    cpu_memory: str | int | None = None  # cap on the host expert store (pinned arena) when offloading

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise MoetierError(f"{name} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise MoetierError("max_model_len must be at least 2")
        if self.expert_slots is not None and self.expert_slots < 1:
            raise MoetierError("expert_slots must be at least 1 (or None for every expert resident)")
        if self.eviction not in POLICY_NAMES:
            raise MoetierError(f"unknown eviction policy {self.eviction!r} (choose {', '.join(POLICY_NAMES)})")
        if self.predictor not in PREDICTOR_NAMES:
            raise MoetierError(f"unknown predictor {self.predictor!r} (choose {', '.join(PREDICTOR_NAMES)})")
        for name in ("gpu_memory", "cpu_memory"):
            if getattr(self, name) is not None:
                parse_size(getattr(self, name))  # a malformed size fails here, before anything loads


@dataclass(frozen=True)
class ResolvedConfig:
    model_dir: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    num_kv_blocks: int
    expert_slots: int | None = None  # None: every expert resident
    memory_plan: MemoryPlan | None = None  # with gpu_memory
    host_experts: int | None = None  # with cpu_memory: experts in host memory, the rest on disk


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MoetierError(f"unknown device {requested!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoetierError("device cuda requested but no CUDA GPU is available")
    return device


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if requested == "auto":
        name = spec.checkpoint_dtype if spec.checkpoint_dtype in _DTYPES else "bfloat16"
        # CPUs have no fast fp16 matmul; bf16 and fp32 are fine there.
        if device.type == "cpu" and name == "float16":
            name = "float32"
        return _DTYPES[name]
    name = _DTYPE_ALIASES.get(requested, requested)
    if name not in _DTYPES:
        raise MoetierError(f"unknown dtype {requested!r} (use auto, float32, bfloat16 or float16)")
    return _DTYPES[name]


def resolve(config: EngineConfig, model_dir: Path, spec: ModelSpec) -> ResolvedConfig:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, spec, device)
    max_model_len = config.max_model_len or min(spec.max_position, _AUTO_MAX_MODEL_LEN)
    if max_model_len > spec.max_position:
        raise MoetierError(f"max_model_len {max_model_len} exceeds the model's {spec.max_position} positions")
    blocks_per_seq = -(-max_model_len // config.block_size)
    plan, expert_slots = resolve_expert_slots(config, spec, dtype, max_model_len)
    resolved = ResolvedConfig(model_dir, dtype, device, max_model_len, blocks_per_seq * config.max_num_seqs,
                              expert_slots, plan, plan.host_experts if plan is not None else None)
    log.info(
        "resolved: model=%s dtype=%s device=%s max_model_len=%d kv_blocks=%d x %d tokens expert_slots=%s",
        model_dir, str(dtype).removeprefix("torch."), device, max_model_len, resolved.num_kv_blocks, config.block_size,
        "all resident" if expert_slots is None else expert_slots,
    )
    return resolved


def resolve_expert_slots(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype,
                         max_model_len: int) -> tuple[MemoryPlan | None, int | None]:
    """Without gpu_memory: expert_slots as given. With it: the planner's slot count (None when every
    expert fits), or, when expert_slots is given too, that count after checking it fits the budget."""
    if config.gpu_memory is None:
        if config.cpu_memory is not None and config.expert_slots is not None:
            # Only the host side matters here: an unbounded GPU budget, the given slots.
            host_plan = plan_memory(spec, dtype, max_model_len, config.max_num_seqs, config.block_size, 1 << 60,
                                    config.cpu_memory, expert_slots=config.expert_slots)
            return host_plan, config.expert_slots
        return None, config.expert_slots
    plan = plan_memory(spec, dtype, max_model_len, config.max_num_seqs, config.block_size, config.gpu_memory,
                       config.cpu_memory, expert_slots=config.expert_slots,
                       max_num_batched_tokens=config.max_num_batched_tokens)
    log.info(
        "memory plan for %s: weights %s, KV cache %s, reserve %s, %s (%d slots of %d bytes, %.0f%% of experts)",
        gib(plan.gpu_budget), gib(plan.non_expert), gib(plan.kv_cache), gib(plan.reserve),
        "experts resident" if plan.resident else "experts offloaded", plan.num_slots, plan.slot_bytes,
        100 * plan.cached_fraction,
    )
    return plan, plan.expert_slots
