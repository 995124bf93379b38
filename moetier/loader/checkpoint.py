"""Safetensors checkpoints: find the shards, validate headers, stream (name, tensor) by mmap."""

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from moetier.errors import CheckpointError

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def check_header(path: Path) -> None:
    """Fails with a clear message on a truncated or corrupt safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is corrupt: shorter than a safetensors header")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path.name} is corrupt: header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} is corrupt: its safetensors header is not valid JSON") from None
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path.name} is truncated: {size} bytes, header promises {8 + header_len + data_end}")


def checkpoint_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        check_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for bad data
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path.name} could not be read: {e}") from None
