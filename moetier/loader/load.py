"""Build a model from a checkpoint directory: read config, build on meta, materialise, fill."""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moetier.errors import MoetierError
from moetier.loader.checkpoint import checkpoint_bytes, iter_tensors, shard_files
from moetier.loader.dummy import fill_dummy
from moetier.loader.resolve import read_config
from moetier.loader.weights import load_weights
from moetier.models.family import Family
from moetier.models.registry import family_for
from moetier.models.spec import ModelSpec
from moetier.models.transformer import CausalLM
from moetier.moe.executor import ExpertExecutor, ResidentExecutor
from moetier.offload.executor import OffloadedExecutor

log = logging.getLogger(__name__)
_PROGRESS_BAR_BYTES = 1 << 30


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory with its config read and its family and spec known."""

    model_dir: Path
    config: dict
    family: Family
    spec: ModelSpec


def read_source(model_dir: Path) -> ModelSource:
    config = read_config(model_dir)
    family = family_for(config)
    return ModelSource(model_dir, config, family, family.read_spec(config))


def disk_tier_key(source: ModelSource, dtype: torch.dtype, device: torch.device, load_format: str, seed: int) -> str:
    """What the experts' bytes depend on, hashed: the checkpoint's shards and config (name, size,
    modification time), or for dummy weights the config, the seed and the device that drew them;
    and the dtype. A changed checkpoint gets a new disk tier file; the same one reuses it."""
    digest = hashlib.sha256(f"moetier-disk-tier-v1|{source.model_dir.resolve()}|{dtype}".encode())
    if load_format == "dummy":
        digest.update(f"|dummy seed {seed} on {device.type}".encode())
        files = [source.model_dir / "config.json"]
    else:
        files = [*shard_files(source.model_dir), source.model_dir / "config.json"]
    for f in files:
        stat = f.stat()
        digest.update(f"|{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def make_executor(
    spec: ModelSpec, dtype: torch.dtype, device: torch.device, expert_slots: int | None = None, eviction: str = "layer",
    host_experts: int | None = None, disk_key: str | None = None,
) -> ExpertExecutor:
    """Resident (every expert in device banks) unless expert_slots asks for a pool of that many slots;
    disk_key names the disk tier's packed file (built once, reused: disk_tier_key)."""
    if expert_slots is None:
        return ResidentExecutor(spec, dtype, device)
    log.info("offloading experts: %d device slots, %s eviction, host copies of all %d", expert_slots, eviction,
             len(spec.moe_layer_ids) * spec.moe.num_experts)
    return OffloadedExecutor(spec, dtype, device, expert_slots, eviction, host_experts=host_experts, disk_key=disk_key)


def build_model(
    spec: ModelSpec, dtype: torch.dtype, device: torch.device, expert_slots: int | None = None, eviction: str = "layer",
    host_experts: int | None = None, disk_key: str | None = None,
) -> tuple[CausalLM, ExpertExecutor]:
    """Allocates (uninitialised) parameters and expert storage directly where they live."""
    executor = make_executor(spec, dtype, device, expert_slots, eviction, host_experts, disk_key)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(spec, executor)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), executor


def load_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, load_format: str, seed: int,
    expert_slots: int | None = None, eviction: str = "layer", host_experts: int | None = None,
) -> tuple[CausalLM, ExpertExecutor]:
    disk_key = disk_tier_key(source, dtype, device, load_format, seed) if host_experts is not None else None
    model, executor = build_model(source.spec, dtype, device, expert_slots, eviction, host_experts, disk_key)
    if load_format == "dummy":
        fill_dummy(model, executor, seed)
    elif load_format in ("auto", "safetensors"):
        files = shard_files(source.model_dir)
        tensors = iter_tensors(files)
        if checkpoint_bytes(files) > _PROGRESS_BAR_BYTES:
            tensors = tqdm(tensors, desc=f"loading {source.model_dir.name}", unit=" tensors")
        with torch.no_grad():
            load_weights(model, executor, source.family, tensors)
    else:
        raise MoetierError(f"unknown --load-format {load_format!r} (choose auto, safetensors or dummy)")
    executor.expert_weights.finish_loading()
    model.fuse_projections()
    if device.type == "cuda":  # the unfused projections and any staging go back to the driver (NVML)
        torch.cuda.empty_cache()
    log.info("loaded %s (%s, %d layers) as %s on %s", source.model_dir, source.spec.architecture, source.spec.num_layers, dtype, device)
    return model, executor
