"""The grouped-query attention block shared by every non-MLA family.

Options cover the families: qkv/o biases (Qwen2-MoE, GPT-OSS), per-head or full-width q/k
RMSNorm (Qwen3-MoE / OLMoE), qkv clipping (OLMoE), attention sinks and sliding windows (GPT-OSS).
Shapes: T flat tokens, H query heads, K kv heads, D head dim.
"""

import torch

from moetier.engine.batch import ForwardBatch
from moetier.kernels import paged_decode, qkv_cache
from moetier.models import paged_attention
from moetier.models.linear import linear
from moetier.models.norm import RMSNorm
from moetier.models.rope import Rotary
from moetier.models.spec import AttentionSpec


class GQAAttention(torch.nn.Module):
    def __init__(self, spec: AttentionSpec, hidden_size: int, eps: float, sliding_window: int | None):
        super().__init__()
        self.spec = spec
        self.sliding_window = sliding_window
        h, k, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = torch.nn.Linear(hidden_size, h * d, bias=spec.qkv_bias)
        self.k_proj = torch.nn.Linear(hidden_size, k * d, bias=spec.qkv_bias)
        self.v_proj = torch.nn.Linear(hidden_size, k * d, bias=spec.qkv_bias)
        self.o_proj = torch.nn.Linear(h * d, hidden_size, bias=spec.o_bias)
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, eps), RMSNorm(k * d, eps)
        if spec.sinks:
            self.sinks = torch.nn.Parameter(torch.zeros(h))
        self.rotary = Rotary(spec.rope)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_qkv() after loading
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Moves q/k/v weights into one matrix (one GEMM per step); the three modules keep views of it."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projections])
        if self.spec.qkv_bias:
            self.qkv_bias = torch.cat([p.bias for p in projections])
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = self.qkv_weight[start : start + rows]
            if self.spec.qkv_bias:
                p.bias.data = self.qkv_bias[start : start + rows]
            start += rows

    def kv_cache_token_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per cached token: one K and one V entry of [K, D]."""
        shape = (self.spec.num_kv_heads, self.spec.head_dim)
        return (shape, shape)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        spec = self.spec
        q_THD = self._rotated_q_kv_cached(x_TD, batch, kv_cache)
        k_cache, v_cache = kv_cache
        sinks_H = self.sinks if spec.sinks else None
        if batch.decode is not None:
            out_THD = paged_decode.paged_decode(
                q_THD, k_cache, v_cache, batch.decode.block_tables_BM, batch.decode.ctx_lens_B,
                spec.softmax_scale, self.sliding_window, sinks_H,
            )
            return linear(out_THD.flatten(1), self.o_proj.weight, self.o_proj.bias)
        out_THD = torch.empty_like(q_THD)
        for seq in batch.seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            mask_LC = paged_attention.sequence_mask(seq.q_len, seq.ctx_len, self.sliding_window, x_TD.device)
            out_THD[rows] = paged_attention.attend(
                q_THD[rows],
                paged_attention.gather_kv(k_cache, seq),
                paged_attention.gather_kv(v_cache, seq),
                mask_LC,
                spec.softmax_scale,
                sinks_H,
            )
        return linear(out_THD.flatten(1), self.o_proj.weight, self.o_proj.bias)

    def _rotated_q_kv_cached(self, x_TD: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, ...]
                             ) -> torch.Tensor:
        """Projections, q/k norms, clipping and rotary; writes the new K and V into the cache and
        returns q [T, H, D]. On the GPU everything after the projection is one kernel."""
        spec = self.spec
        if self.qkv_weight is not None:
            qkv_TC = linear(x_TD, self.qkv_weight, self.qkv_bias)
            if qkv_cache.supported(qkv_TC, spec):
                norms = (self.q_norm.weight, self.k_norm.weight) if spec.qk_norm != "none" else (None, None)
                eps = self.q_norm.eps if spec.qk_norm != "none" else 0.0
                return qkv_cache.norm_rotate_cache(
                    qkv_TC, batch.positions_T, batch.slot_mapping_T, kv_cache[0], kv_cache[1], spec,
                    self.rotary.inv_freq_on(qkv_TC.device), self.rotary.attention_scaling, *norms, eps,
                )
            sizes = [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
            q, k, v = qkv_TC.split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD)
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q_THD = q.unflatten(-1, (spec.num_heads, spec.head_dim))
        k_TKD = k.unflatten(-1, (spec.num_kv_heads, spec.head_dim))
        v_TKD = v.unflatten(-1, (spec.num_kv_heads, spec.head_dim))
        if spec.qk_norm == "head":
            q_THD, k_TKD = self.q_norm(q_THD), self.k_norm(k_TKD)
        q_THD, k_TKD = self.rotary.rotate_qk(q_THD, k_TKD, batch.positions_T)
        paged_attention.write_kv(kv_cache[0], batch.slot_mapping_T, k_TKD)
        paged_attention.write_kv(kv_cache[1], batch.slot_mapping_T, v_TKD)
        return q_THD
