"""Config-reading helpers shared by the family readers."""

from moetier.errors import CheckpointError
from moetier.models.spec import AttentionSpec, RopeSpec


def require(cfg: dict, key: str):
    if key not in cfg:
        raise CheckpointError(f"config.json has no '{key}', which {cfg.get('architectures')} needs")
    return cfg[key]


def require_any(cfg: dict, *keys: str):
    """The first of several spellings of one setting (transformers renamed some between versions)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise CheckpointError(f"config.json has none of {', '.join(keys)}, which {cfg.get('architectures')} needs")


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or require(cfg, "hidden_size") // require(cfg, "num_attention_heads")


def checkpoint_dtype(cfg: dict) -> str:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def read_rope(cfg: dict, rotary_dim: int, interleaved: bool = False) -> RopeSpec:
    """Reads transformers 5 `rope_parameters` or the legacy rope_theta + rope_scaling keys."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "yarn"):
        raise CheckpointError(f"unsupported rope type '{kind}' (supported: default, linear, yarn)")
    factor = float(params.get("factor") or 1.0)
    original = params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 0)
    return RopeSpec(
        rotary_dim=int(rotary_dim * cfg.get("partial_rotary_factor", 1.0)),
        theta=float(params["rope_theta"]),
        kind=kind,
        factor=factor,
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def layer_windows(cfg: dict, num_layers: int) -> list[int | None]:
    """Sliding window per layer from `layer_types`, else one window for all layers (or none)."""
    window = cfg.get("sliding_window")
    if cfg.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"][:num_layers]]
    if cfg.get("use_sliding_window") is False:
        return [None] * num_layers
    return [window or None] * num_layers


def gqa_attention(cfg: dict, **options) -> AttentionSpec:
    """The GQA block's spec from the usual config keys; options set the family's switches
    (biases, q/k norm, clipping, sinks)."""
    dim = head_dim(cfg)
    return AttentionSpec(
        kind="gqa",
        num_heads=require(cfg, "num_attention_heads"),
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=dim,
        rope=read_rope(cfg, dim),
        softmax_scale=dim**-0.5,
        **options,
    )
