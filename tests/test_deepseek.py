"""DeepSeek-V2/V3 (MLA, grouped routing, shared experts) against transformers in fp32.

Four tiny checkpoints cover both versions, both expert layouts, both V2 top-k methods, YaRN with
mscale, V3's correction bias (with negative values) and V3's non-interleaved rope option.
"""

import pytest
import safetensors.torch
import torch
import transformers

from checkpoints import write_tokenizer
from moetier import LLM, SamplingParams
from moetier.models.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from moetier.models.mla import MLAAttention
from moetier.models.spec import RouterSpec
from moetier.moe.router import Router
from parity import assert_batched_equals_one_by_one

LOGIT_RTOL = 1e-4
TIE_MARGIN = 1e-5
PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]
_COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
             mscale=0.707, mscale_all_dim=0.707)
CASES = {
    # name: (model class, config, fused expert layout)
    "v2-group-per_expert": (transformers.DeepseekV2ForCausalLM, lambda: transformers.DeepseekV2Config(
        **_COMMON, n_shared_experts=2, q_lora_rank=None, topk_method="group_limited_greedy",
        routed_scaling_factor=2.0), False),
    "v2-greedy-yarn-fused": (transformers.DeepseekV2ForCausalLM, lambda: transformers.DeepseekV2Config(
        **_COMMON, n_shared_experts=2, q_lora_rank=None, topk_method="greedy", rope_parameters=_YARN), True),
    "v3-yarn-per_expert": (transformers.DeepseekV3ForCausalLM, lambda: transformers.DeepseekV3Config(
        **_COMMON, n_shared_experts=1, q_lora_rank=24, rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
        False),
    "v3-halves-fused": (transformers.DeepseekV3ForCausalLM, lambda: transformers.DeepseekV3Config(
        **_COMMON, n_shared_experts=1, q_lora_rank=24, rope_interleave=False, rms_norm_eps=1e-5), True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_deepseek(name: str, out) -> torch.nn.Module:
    model_class, config, fused = CASES[name]
    torch.manual_seed(0)
    model = model_class(config()).eval()
    with torch.no_grad():  # spread routing so top-k choices are not near-ties; biases of both signs
        for param_name, param in model.named_parameters():
            if param_name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.5)
    model.save_pretrained(out, save_original_format=not fused)
    write_tokenizer(out)
    if name.startswith("v3") and not fused:
        # Real V3 checkpoints carry multi-token-prediction modules as one extra layer: skipped.
        tensors = safetensors.torch.load_file(out / "model.safetensors")
        tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
        tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(128, 16)
        safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = make_deepseek(request.param, path)
    return LLM(str(path), dtype="float32", max_model_len=128), reference


def set_form(llm: LLM, form: str) -> None:
    for layer in llm.engine.model.model.layers:
        layer.self_attn.form = form


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def test_latent_kv_cache(pair):
    llm, _ = pair
    attention = llm.engine.model.model.layers[0].self_attn
    assert isinstance(attention, MLAAttention)
    assert llm.engine.model.kv_cache_token_shapes() == [((16 + 8,),)] * 3
    # Decode steps take the absorbed form, prefill the expanded one.
    assert attention.uses_absorbed(1, 40) and not attention.uses_absorbed(40, 40)


@pytest.mark.parametrize("form", ["auto", "expanded", "absorbed"])
def test_logits_match_transformers(pair, form):
    llm, reference = pair
    set_form(llm, form)
    try:
        for ids in PROMPTS:
            theirs = reference_logits(reference, ids)
            err = (llm.score(ids) - theirs).abs().max().item()
            assert err <= LOGIT_RTOL * theirs.abs().max().item(), f"max logit error {err}"
    finally:
        set_form(llm, "auto")


def test_absorbed_equals_expanded(pair):
    llm, _ = pair
    ids = PROMPTS[1]
    set_form(llm, "expanded")
    expanded = llm.score(ids)
    set_form(llm, "absorbed")
    absorbed = llm.score(ids)
    set_form(llm, "auto")
    assert (absorbed - expanded).abs().max().item() <= 1e-5 * expanded.abs().max().item()


@pytest.mark.parametrize("form", ["auto", "expanded"])
def test_greedy_matches_transformers_generate(pair, form):
    llm, reference = pair
    ids, steps = PROMPTS[1], 16
    reference.generation_config.eos_token_id = None  # run all steps, as ignore_eos does
    with torch.no_grad():
        generated = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps,
                                       output_logits=True, return_dict_in_generate=True)
    theirs = generated.sequences[0, len(ids):].tolist()
    set_form(llm, form)
    try:
        logprobs = []  # each step's entry, as streamed
        [output] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True, logprobs=0),
                                on_output=lambda _, out: logprobs.extend(out.logprobs))
    finally:
        set_form(llm, "auto")
    assert len(output.token_ids) == steps
    for step, (ours, their_token) in enumerate(zip(output.token_ids, theirs)):
        their_logits = generated.logits[step][0].float()
        if ours != their_token:
            top2 = torch.topk(their_logits, 2).values
            assert top2[0] - top2[1] < TIE_MARGIN, f"greedy token {step} differs ({ours} vs {their_token})"
            ours_logits = llm.score(ids + theirs[:step])[-1]
            assert (ours_logits - their_logits).abs().max() <= LOGIT_RTOL * their_logits.abs().max()
            return  # a near-tie: the continuations may legitimately diverge from here
        # The decode step's numbers, not just its argmax: the chosen token's logprob.
        their_logprob = torch.log_softmax(their_logits, dim=-1)[ours].item()
        assert abs(logprobs[step]["logprob"] - their_logprob) <= 1e-4


def test_batched_generation_equals_one_by_one(pair):
    llm, _ = pair
    assert_batched_equals_one_by_one(llm, PROMPTS)


def test_spec_reading():
    v2 = DEEPSEEK_V2.read_spec(CASES["v2-group-per_expert"][1]().to_dict() | {"architectures": ["x"]})
    assert [layer.is_moe for layer in v2.layers] == [False, True, True]
    assert v2.moe.shared_intermediate_size == 64 and v2.dense_intermediate_size == 96
    assert (v2.moe.router.num_groups, v2.moe.router.topk_groups, v2.moe.router.group_score) == (2, 1, "max")
    assert v2.attention.rope.interleaved and v2.attention.softmax_scale == pytest.approx(24**-0.5)
    config = CASES["v3-yarn-per_expert"][1]().to_dict()
    v3 = DEEPSEEK_V3.read_spec(config | {"num_hidden_layers": 5, "moe_layer_freq": 2, "architectures": ["x"]})
    assert [layer.is_moe for layer in v3.layers] == [False, False, True, False, True]
    assert v3.moe.router.correction_bias and v3.moe.router.group_score == "top2_sum"
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert v3.attention.softmax_scale == pytest.approx(24**-0.5 * mscale**2)
    renamed = DEEPSEEK_V3.our_name("model.layers.1.mlp.shared_experts.up_proj.weight")
    assert renamed == "model.layers.1.mlp.shared_expert.up_proj.weight"


def _same_routing(ours, their_weights, their_ids):
    order_ours, order_theirs = ours.topk_ids_TK.argsort(dim=-1), their_ids.argsort(dim=-1)
    assert torch.equal(ours.topk_ids_TK.gather(1, order_ours), their_ids.gather(1, order_theirs))
    assert torch.allclose(ours.topk_weights_TK.gather(1, order_ours), their_weights.gather(1, order_theirs), atol=1e-6)


@pytest.mark.parametrize("version,method", [(2, "greedy"), (2, "group_limited_greedy"), (3, "noaux_tc")])
def test_router_matches_transformers(version, method):
    torch.manual_seed(1)
    num_experts, hidden = 16, 32
    if version == 2:
        config = transformers.DeepseekV2Config(
            hidden_size=hidden, n_routed_experts=num_experts, num_experts_per_tok=3, n_group=4, topk_group=2,
            topk_method=method, routed_scaling_factor=16.0)
        theirs = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(config)
    else:
        config = transformers.DeepseekV3Config(
            hidden_size=hidden, n_routed_experts=num_experts, num_experts_per_tok=3, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True)
        theirs = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
        # Strongly negative biases: a 0.0 fill for masked groups would wrongly prefer them.
        theirs.e_score_correction_bias.copy_(torch.randn(num_experts) - 1.5)
    theirs.weight.data.normal_()
    family = DEEPSEEK_V2 if version == 2 else DEEPSEEK_V3
    spec: RouterSpec = family.read_spec({**config.to_dict(), "architectures": ["x"]}).moe.router
    ours = Router(spec, hidden)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(64, hidden)
    _, their_weights, their_ids = theirs(x)
    _same_routing(ours(x), their_weights, their_ids)
