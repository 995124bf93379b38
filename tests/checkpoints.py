"""Tiny real-format checkpoints made with transformers' own classes, for parity tests.

Every family in both expert layouts: per-expert tensors (save_pretrained's default, the
original Hub format) and fused [E, 2F, D] tensors (save_original_format=False).
"""

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Mixture of experts models route each token to a few experts.",
    "import os\nimport sys\nprint(os.path.join('a', 'b'))\n",
]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

FAMILY_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=24, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**_COMMON, intermediate_size=32, num_experts=8, clip_qkv=4.0),
}
_MODEL_CLASSES = {
    "mixtral": transformers.MixtralForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
}


def write_tokenizer(out: Path) -> None:
    """A small byte-level BPE trained on fixed text, with a chat template and eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TEXT, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(__import__("json").dumps(config))


def make_checkpoint(family: str, out: Path, fused: bool = False, seed: int = 0) -> torch.nn.Module:
    """Saves a randomly initialised tiny model of the family (fp32) with a tokenizer; returns it."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = _MODEL_CLASSES[family](config).eval()
    # Spread router logits so top-k choices are not near-ties under rounding differences.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2 and param.shape[0] > 1:
                param.normal_(0.0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_original_format=not fused)
    write_tokenizer(out)
    return model
