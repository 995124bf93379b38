"""Multi-head latent attention (DeepSeek-V2/V3), caching the compressed latent, not K and V.

Per token the cache holds one vector [R + P]: the kv_a_layernorm'd latent c (R = kv_lora_rank)
and the roped shared key k_pe (P = qk_rope_head_dim). Attention runs in one of two forms:
  expanded  kv_b_proj turns every cached c into per-head keys and values (cheap for prefill);
  absorbed  kv_b_proj's key half is folded into the queries and its value half into the output,
            so each head attends over the latent itself (cheap for decode: no per-token expansion).
Both compute the same function; "auto" picks the cheaper per sequence and step.
Shapes: T flat tokens, L new tokens of one sequence, C context tokens, H heads,
N = qk_nope_head_dim, P = qk_rope_head_dim, V = v_head_dim, R = kv_lora_rank.
"""

import torch

from moetier.engine.batch import ForwardBatch
from moetier.models import paged_attention
from moetier.models.norm import RMSNorm
from moetier.models.rope import Rotary
from moetier.models.spec import AttentionSpec

MLA_FORMS = ("auto", "expanded", "absorbed")
# The latent norms use RMSNorm's default eps in every DeepSeek implementation, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def expanded_cost(spec: AttentionSpec, q_len: int, ctx_len: int) -> int:
    """Multiply-adds per head of the expanded form: expand C latents, then attend."""
    n, p, v, r = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    return ctx_len * r * (n + v) + q_len * ctx_len * (n + p + v)


def absorbed_cost(spec: AttentionSpec, q_len: int, ctx_len: int) -> int:
    """Multiply-adds per head of the absorbed form: fold L queries and outputs, attend over the latent."""
    n, p, v, r = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    return q_len * r * (n + v) + q_len * ctx_len * (2 * r + p)


class MLAAttention(torch.nn.Module):
    def __init__(self, spec: AttentionSpec, hidden_size: int, eps: float):
        """eps (rms_norm_eps) is the decoder block's; the latent norms use _LATENT_NORM_EPS."""
        super().__init__()
        self.spec = spec
        self.form = "auto"  # one of MLA_FORMS
        h, n, p, v, r = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
        if spec.q_lora_rank is None:
            self.q_proj = torch.nn.Linear(hidden_size, h * (n + p), bias=False)
        else:
            self.q_a_proj = torch.nn.Linear(hidden_size, spec.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = torch.nn.Linear(spec.q_lora_rank, h * (n + p), bias=False)
        self.kv_a_proj_with_mqa = torch.nn.Linear(hidden_size, r + p, bias=spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(r, _LATENT_NORM_EPS)
        self.kv_b_proj = torch.nn.Linear(r, h * (n + v), bias=False)
        self.o_proj = torch.nn.Linear(h * v, hidden_size, bias=spec.o_bias)
        self.rotary = Rotary(spec.rope)

    def kv_cache_token_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per cached token: the latent c and the roped k_pe, side by side: [R + P]."""
        return ((self.spec.kv_lora_rank + self.spec.qk_rope_head_dim,),)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        spec = self.spec
        n, p, r = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
        if spec.q_lora_rank is None:
            q = self.q_proj(x_TD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD)))
        q_nope_THN, q_pe_THP = q.unflatten(-1, (spec.num_heads, n + p)).split([n, p], dim=-1)
        c_TR, k_pe_TP = self.kv_a_proj_with_mqa(x_TD).split([r, p], dim=-1)
        cos, sin = self.rotary.cos_sin(batch.positions_T, q.dtype)
        q_pe_THP = self.rotary.apply(q_pe_THP, cos, sin)
        k_pe_TP = self.rotary.apply(k_pe_TP[:, None, :], cos, sin)[:, 0]
        latent_T_ = torch.cat([self.kv_a_layernorm(c_TR), k_pe_TP], dim=-1)  # [T, R + P]

        (cache,) = kv_cache
        paged_attention.write_kv(cache, batch.slot_mapping_T, latent_T_)
        out_THV = q.new_empty(x_TD.shape[0], spec.num_heads, spec.v_head_dim)
        for seq in batch.seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            latent_C_ = paged_attention.gather_kv(cache, seq)
            mask_LC = paged_attention.causal_mask(seq.q_len, seq.ctx_len, None, x_TD.device)
            attend = self.attend_absorbed if self.uses_absorbed(seq.q_len, seq.ctx_len) else self.attend_expanded
            out_THV[rows] = attend(q_nope_THN[rows], q_pe_THP[rows], latent_C_, mask_LC)
        return self.o_proj(out_THV.flatten(1))

    def uses_absorbed(self, q_len: int, ctx_len: int) -> bool:
        if self.form == "auto":
            return absorbed_cost(self.spec, q_len, ctx_len) < expanded_cost(self.spec, q_len, ctx_len)
        return self.form == "absorbed"

    def attend_expanded(
        self, q_nope_LHN: torch.Tensor, q_pe_LHP: torch.Tensor, latent_C_: torch.Tensor, mask_LC: torch.Tensor
    ) -> torch.Tensor:
        """Expands the cached latents into per-head K and V, then plain attention: [L, H, V]."""
        spec = self.spec
        r, n, v = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim
        kv_CHX = self.kv_b_proj(latent_C_[:, :r]).unflatten(-1, (spec.num_heads, n + v))
        k_nope_CHN, v_CHV = kv_CHX.split([n, v], dim=-1)
        k_pe_CHP = latent_C_[:, None, r:].expand(-1, spec.num_heads, -1)
        k_CHQ = torch.cat([k_nope_CHN, k_pe_CHP], dim=-1)
        q_LHQ = torch.cat([q_nope_LHN, q_pe_LHP], dim=-1)
        return paged_attention.attend(q_LHQ, k_CHQ, v_CHV, mask_LC, spec.softmax_scale)

    def attend_absorbed(
        self, q_nope_LHN: torch.Tensor, q_pe_LHP: torch.Tensor, latent_C_: torch.Tensor, mask_LC: torch.Tensor
    ) -> torch.Tensor:
        """Attends over the latent with kv_b_proj folded in: q_nope @ W_UK per head scores against c,
        and the attended latent goes through W_UV per head: [L, H, V]."""
        spec = self.spec
        r, n, v = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim
        w_uk_HNR, w_uv_HVR = self.kv_b_proj.weight.unflatten(0, (spec.num_heads, n + v)).split([n, v], dim=1)
        q_lat_LHR = torch.einsum("lhn,hnr->lhr", q_nope_LHN, w_uk_HNR)
        # One shared "kv head" (the latent): scores [H, L, C] = [q_lat, q_pe] . [c, k_pe], in fp32.
        q_HL_ = torch.cat([q_lat_LHR, q_pe_LHP], dim=-1).float().transpose(0, 1)
        scores_HLC = torch.matmul(q_HL_, latent_C_.float().T) * spec.softmax_scale
        probs_HLC = torch.softmax(scores_HLC.masked_fill(~mask_LC, float("-inf")), dim=-1)
        out_lat_HLR = torch.matmul(probs_HLC, latent_C_[:, :r].float()).to(q_nope_LHN.dtype)
        return torch.einsum("hlr,hvr->lhv", out_lat_HLR, w_uv_HVR)
