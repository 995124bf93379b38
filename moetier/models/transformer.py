"""The decoder-only causal LM every family is built from (HF module names, single device).

Module names follow the HF checkpoints (model.layers.N.self_attn.q_proj, ...), so non-expert
weights load by name; routed experts live in the executor's banks, outside the module tree.
"""

import torch

from moetier.engine.batch import ForwardBatch
from moetier.models.attention import GQAAttention
from moetier.models.mlp import DenseMLP
from moetier.models.norm import RMSNorm
from moetier.models.spec import ModelSpec
from moetier.moe.executor import ExpertExecutor
from moetier.moe.layer import MoELayer


def build_attention(spec: ModelSpec, layer: int) -> torch.nn.Module:
    window = spec.layers[layer].sliding_window
    if spec.attention.kind == "mla":
        from moetier.models.mla import MLAAttention

        return MLAAttention(spec.attention, spec.hidden_size, spec.rms_norm_eps)
    return GQAAttention(spec.attention, spec.hidden_size, spec.rms_norm_eps, window)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, executor: ExpertExecutor):
        super().__init__()
        self.self_attn = build_attention(spec, layer)
        if spec.layers[layer].is_moe:
            self.mlp = MoELayer(layer, spec.moe, spec.hidden_size, executor)
        else:
            self.mlp = DenseMLP(spec.hidden_size, spec.dense_intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, x_TD: torch.Tensor, residual_TD: torch.Tensor | None, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next layer (or the
        final norm) adds the two inside its fused norm, saving a kernel per layer."""
        if residual_TD is None:
            residual_TD, h_TD = x_TD, self.input_layernorm(x_TD)
        else:
            residual_TD, h_TD = self.input_layernorm.add_forward(x_TD, residual_TD)
        residual_TD, h_TD = self.post_attention_layernorm.add_forward(self.self_attn(h_TD, batch, kv_cache), residual_TD)
        return self.mlp(h_TD), residual_TD


class Backbone(torch.nn.Module):
    def __init__(self, spec: ModelSpec, executor: ExpertExecutor):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = torch.nn.ModuleList(DecoderLayer(spec, i, executor) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(torch.nn.Module):
    def __init__(self, spec: ModelSpec, executor: ExpertExecutor):
        super().__init__()
        self.spec = spec
        self.executor = executor
        self.model = Backbone(spec, executor)
        self.lm_head = torch.nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def kv_cache_token_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return [layer.self_attn.kv_cache_token_shapes() for layer in self.model.layers]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Returns logits [len(batch.logits_indices), vocab] in fp32."""
        x_TD, residual_TD = self.model.embed_tokens(batch.input_ids_T), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x_TD, residual_TD = layer(x_TD, residual_TD, batch, kv_cache)
        rows = batch.logits_indices
        _, h_TD = self.model.norm.add_forward(x_TD[rows], residual_TD[rows])
        return self.lm_head(h_TD).float()

    def fuse_projections(self) -> None:
        """After loading: one GEMM for q, k and v where the attention block supports it."""
        for layer in self.model.layers:
            if hasattr(layer.self_attn, "fuse_qkv"):
                layer.self_attn.fuse_qkv()
