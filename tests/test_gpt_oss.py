"""GPT-OSS parity with transformers (fp32): float checkpoints in both save formats and MXFP4 checkpoints.

The tiny model alternates sliding (window 8) and full layers, uses YaRN with truncate=False, and has
expert weights large enough that the clamped SwiGLU clamps; prompts are longer than the window.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from checkpoints import write_tokenizer
from moetier import LLM, SamplingParams
from moetier.errors import CheckpointError
from moetier.models.families.gpt_oss import GPT_OSS
from moetier.models.family import ExpertTensor
from moetier.models.registry import family_for
from moetier.models.rope import Rotary
from moetier.quant.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4
from parity import assert_batched_equals_one_by_one

LOGIT_RTOL = 1e-4
TIE_MARGIN = 1e-5
PROMPTS = [
    [(7 * i + 3) % 300 + 5 for i in range(37)],
    [5, 17, 42, 99, 7, 250, 3, 11, 64, 128, 31, 90, 2, 77, 45],
    [300, 4],
]
_EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")


def _config() -> transformers.GptOssConfig:
    return transformers.GptOssConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=64),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _reference_model(seed: int = 0) -> transformers.GptOssForCausalLM:
    """Random weights scaled so routing is decisive, biases and sinks matter, and the SwiGLU clamp is hit."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(_config()).eval()
    scales = {"experts.gate_up_proj": 0.5, "experts.down_proj": 0.1, "lm_head.weight": 0.5, "embed_tokens.weight": 1.0,
              "q_proj.weight": 0.2, "k_proj.weight": 0.2}
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = next((s for suffix, s in scales.items() if name.endswith(suffix)), None)
            if std is None and ("router" in name or name.endswith(("bias", "sinks"))):
                std = 0.1
            if std is not None:
                param.normal_(0.0, std)
    return model


def _save(model: torch.nn.Module, path: Path, original_format: bool = True) -> Path:
    model.save_pretrained(path, save_original_format=original_format)
    write_tokenizer(path)
    return path


def _to_mxfp4(path: Path) -> None:
    """Rewrites a float checkpoint's experts as MXFP4 blocks + scales, as the released GPT-OSS checkpoints are."""
    tensors = {}
    for name, tensor in load_file(path / "model.safetensors").items():
        if name.endswith(_EXPERT_WEIGHTS):  # [E, K, N] -> rows of N along which K is blocked
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(tensor.transpose(1, 2))
        else:
            tensors[name] = tensor
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _assert_logits_match(llm: LLM, reference: torch.nn.Module, ids: list[int]) -> None:
    ours, theirs = llm.score(ids), _logits(reference, ids)
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= LOGIT_RTOL * scale, f"max logit error {err} (max |logit| {scale:.3f})"


@pytest.fixture(scope="module")
def reference():
    return _reference_model()


@pytest.fixture(scope="module")
def llm(reference, tmp_path_factory):
    path = _save(reference, tmp_path_factory.mktemp("gpt_oss"))
    return LLM(str(path), dtype="float32", max_model_len=128)


def test_both_save_formats_write_the_same_tensors(reference, tmp_path):
    """transformers has no conversion mapping for GPT-OSS: both formats hold the fused interleaved layout,
    so the parity tests below cover both. If that ever changes, this fails and they must run on both."""
    original = load_file(_save(reference, tmp_path / "original", original_format=True) / "model.safetensors")
    fused = load_file(_save(reference, tmp_path / "fused", original_format=False) / "model.safetensors")
    assert original.keys() == fused.keys()
    assert all(torch.equal(original[name], fused[name]) for name in original)
    assert original["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 2 * 32)  # [E, D, 2F]


def test_logits_match_transformers(llm, reference):
    for ids in PROMPTS:
        _assert_logits_match(llm, reference, ids)


def test_greedy_tokens_match_transformers_generate(llm, reference):
    prompt, steps = PROMPTS[1], 16
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, eos_token_id=None,
                                 output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences[0, len(prompt):].tolist()
    [ours] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert len(theirs) == len(ours.token_ids) == steps
    for step, (a, b) in enumerate(zip(ours.token_ids, theirs)):
        if a != b:  # only a near-tie may flip; then the logits at that step must still agree
            top2 = torch.topk(out.logits[step][0].float(), 2).values
            assert top2[0] - top2[1] < TIE_MARGIN, f"greedy token {step} differs ({a} vs {b})"
            _assert_logits_match(llm, reference, prompt + theirs[:step])
            break


def test_batched_generation_equals_one_by_one(llm):
    assert_batched_equals_one_by_one(llm, PROMPTS)


def test_mxfp4_round_trip_is_exact_on_e2m1_values():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 128))
    block_exponents = torch.randint(-20, 20, (3, 5, 4)).repeat_interleave(32, dim=-1)
    values = torch.ldexp(torch.tensor(E2M1_VALUES)[codes], block_exponents.float())
    blocks, scales = quantize_mxfp4(values)
    assert blocks.shape == (3, 5, 4, 16) and scales.shape == (3, 5, 4)
    assert torch.equal(dequantize_mxfp4(blocks, scales), values)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), values)


def test_mxfp4_rounding_and_bit_layout():
    row = torch.zeros(32)
    row[:9] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 1.0])  # midpoints round to the even code
    blocks, scales = quantize_mxfp4(row)
    assert scales.tolist() == [127]  # max 5 <= 6: scale 2**0
    assert dequantize_mxfp4(blocks, scales)[:9].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 1.0]
    assert blocks[0, 0].item() == 0x20  # value 0 (code 0) low nibble, value 1 (1.0 = code 2) high nibble
    assert quantize_mxfp4(torch.full((32,), 12.0))[1].tolist() == [128]  # 12 = 6 * 2**1


def test_mxfp4_dequantization_equals_transformers():
    torch.manual_seed(0)
    blocks, scales = quantize_mxfp4(torch.randn(4, 24, 64))
    theirs_EKN = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(1, 2), theirs_EKN)


def test_mxfp4_checkpoint_matches_dequantized_reference(tmp_path):
    reference = _reference_model(seed=1)
    path = _save(reference, tmp_path)
    _to_mxfp4(path)
    # The reference runs on exactly the weights the checkpoint holds: its experts dequantized.
    packed = load_file(path / "model.safetensors")
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(_EXPERT_WEIGHTS):
                param.copy_(dequantize_mxfp4(packed[name + "_blocks"], packed[name + "_scales"]).transpose(1, 2))
    llm = LLM(str(path), dtype="float32", max_model_len=128)
    for ids in PROMPTS[:2]:
        _assert_logits_match(llm, reference, ids)
    # transformers loads the same checkpoint on CPU by dequantizing it (to bf16, exactly).
    loaded = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).float().eval()
    for name, param in reference.named_parameters():
        assert torch.equal(loaded.get_parameter(name), param), name
    _assert_logits_match(llm, loaded, PROMPTS[0])


def test_convert_emits_per_expert_parts_in_our_layout():
    e, d, f = 2, 32, 3
    gate_up_EDN = torch.arange(e * d * 2 * f, dtype=torch.float32).view(e, d, 2 * f)  # N = 2F, gate even, up odd
    down_EFD = torch.randn(e, 32, d)  # MXFP4 blocks F by 32, so this one gets its own F
    stream = [
        ("model.layers.0.mlp.experts.gate_up_proj", gate_up_EDN),
        ("model.layers.0.mlp.experts.gate_up_proj_bias", torch.tensor([[0.0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])),
        ("model.layers.0.mlp.experts.down_proj_blocks", quantize_mxfp4(down_EFD.transpose(1, 2))[0]),
        ("model.layers.0.mlp.router.weight", torch.zeros(e, d)),
        ("model.layers.0.mlp.experts.down_proj_scales", quantize_mxfp4(down_EFD.transpose(1, 2))[1]),
    ]
    out = dict(GPT_OSS.convert(iter(stream)))
    assert torch.equal(out["model.layers.0.mlp.experts.1.gate_up_proj"][:f], gate_up_EDN[1, :, 0::2].T)
    assert torch.equal(out["model.layers.0.mlp.experts.1.gate_up_proj"][f:], gate_up_EDN[1, :, 1::2].T)
    assert out["model.layers.0.mlp.experts.1.gate_up_proj_bias"].tolist() == [6, 8, 10, 7, 9, 11]
    down_blocks, down_scales = stream[2][1], stream[4][1]
    assert torch.equal(out["model.layers.0.mlp.experts.0.down_proj"], dequantize_mxfp4(down_blocks[0], down_scales[0]))
    assert GPT_OSS.parse_expert("model.layers.0.mlp.experts.1.gate_up_proj_bias") == ExpertTensor(0, 1, "gate_up_bias")
    assert GPT_OSS.our_name("model.layers.0.mlp.router.weight") == "model.layers.0.mlp.gate.weight"
    with pytest.raises(CheckpointError, match="without their blocks/scales partner"):
        list(GPT_OSS.convert(iter(stream[2:4])))


def test_reads_the_released_gpt_oss_config():
    """openai/gpt-oss-20b's config.json (legacy rope_scaling keys): our YaRN tables equal transformers' bit for bit."""
    released = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 24,
        "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
        "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-05, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "swiglu_limit": 7.0, "attention_bias": True,
        "rope_theta": 150000, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                               "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                               "truncate": False},
        "quantization_config": {"quant_method": "mxfp4"}, "tie_word_embeddings": False,
    }
    spec = family_for(released).read_spec(released)
    assert [layer.sliding_window for layer in spec.layers[:3]] == [128, None, 128]
    assert (spec.moe.top_k, spec.moe.num_experts, spec.moe.activation, spec.attention.sinks) == (4, 32, "gpt_oss", True)
    assert spec.attention.rope.truncate is False
    theirs_inv_freq, theirs_scaling = ROPE_INIT_FUNCTIONS["yarn"](transformers.GptOssConfig.from_dict(released), None)
    ours = Rotary(spec.attention.rope)
    assert torch.equal(ours.inv_freq_cpu, theirs_inv_freq) and ours.attention_scaling == theirs_scaling
