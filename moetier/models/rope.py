"""Rotary position embeddings: default, linear and YaRN frequency schedules."""

import math

import torch

from moetier.kernels.fuse import fused
from moetier.models.spec import RopeSpec


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(spec: RopeSpec, base_inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    dim, base = spec.rotary_dim, spec.theta

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(spec.original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = base_inv_freq / spec.factor * (1 - extrapolation_weight) + base_inv_freq * extrapolation_weight
    if spec.attention_factor is not None:
        attention_factor = spec.attention_factor
    elif spec.mscale and spec.mscale_all_dim:
        attention_factor = _yarn_mscale(spec.factor, spec.mscale) / _yarn_mscale(spec.factor, spec.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(spec.factor)
    return inv_freq, attention_factor


def _cos_sin(positions_T, inv_freq_R, scaling: float, interleaved: bool, dtype: torch.dtype):
    freqs_TR = positions_T.float()[:, None] * inv_freq_R[None, :]  # R = rotary_dim / 2
    emb_T2R = freqs_TR.repeat_interleave(2, dim=-1) if interleaved else torch.cat([freqs_TR, freqs_TR], dim=-1)
    return (emb_T2R.cos() * scaling).to(dtype), (emb_T2R.sin() * scaling).to(dtype)


def _rotate(x_THD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, rotary_dim: int, interleaved: bool):
    """Rotates the first rotary_dim features of every head; the rest pass through."""
    rot, rest = x_THD[..., :rotary_dim], x_THD[..., rotary_dim:]
    if interleaved:
        pairs = rot.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = rot.shape[-1] // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos_TR[:, None, :] + rotated * sin_TR[:, None, :]
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


@fused
def _rope_qk(q_THD, k_TKD, positions_T, inv_freq_R, scaling: float, rotary_dim: int, interleaved: bool):
    cos, sin = _cos_sin(positions_T, inv_freq_R, scaling, interleaved, q_THD.dtype)
    return _rotate(q_THD, cos, sin, rotary_dim, interleaved), _rotate(k_TKD, cos, sin, rotary_dim, interleaved)


class Rotary(torch.nn.Module):
    """Computes cos/sin for arbitrary (ragged, batched) positions and applies them."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.spec = spec
        exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64, device="cpu").float() / spec.rotary_dim
        inv_freq = 1.0 / (spec.theta**exponents)
        self.attention_scaling = 1.0
        if spec.kind == "linear":
            inv_freq = inv_freq / spec.factor
        elif spec.kind == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(spec, inv_freq)
        # A plain attribute, not a buffer: models are built on "meta" and must keep these values.
        self.inv_freq_cpu = inv_freq
        self._inv_freq = {}

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self.inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def cos_sin(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_R = self.inv_freq_on(positions_T.device)
        return _cos_sin(positions_T, inv_freq_R, self.attention_scaling, self.spec.interleaved, dtype)

    def apply(self, x_THD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        return _rotate(x_THD, cos_TR, sin_TR, self.spec.rotary_dim, self.spec.interleaved)

    def rotate_qk(self, q_THD: torch.Tensor, k_TKD: torch.Tensor, positions_T: torch.Tensor):
        """Both q and k rotated at their positions, fused into one kernel on the GPU."""
        inv_freq_R = self.inv_freq_on(positions_T.device)
        return _rope_qk(
            q_THD, k_TKD, positions_T, inv_freq_R, self.attention_scaling, self.spec.rotary_dim, self.spec.interleaved
        )
