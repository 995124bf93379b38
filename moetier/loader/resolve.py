"""Turn the user's --model into a local checkpoint directory (a path, or a Hub id in the local cache)."""

import json
from pathlib import Path

from moetier.errors import CheckpointError, MoetierError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-moe"


def resolve_model_dir(model: str | None) -> Path:
    if model is None:
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoetierError(f"--model {model} is a file; give the checkpoint directory that holds config.json")
    elif _looks_like_hub_id(model):
        path = _from_hub_cache(model)
    else:
        raise MoetierError(f"model path {model} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{model_dir / 'config.json'} is not valid JSON: {e}") from None


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise MoetierError(
            f"'{repo_id}' is not a directory and is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); moetier never downloads weights: fetch it first "
            f"(e.g. `hf download {repo_id}`) and run again"
        ) from None
