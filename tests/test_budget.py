"""The memory planner (CPU): its byte counts equal what the engine allocates, slots grow with the
budget, impossible budgets fail clearly, `moetier fit` on the benchmark shapes, and an engine given
gpu_memory runs the planned slots bitwise equal to resident."""

import json
from pathlib import Path

import pytest
import torch
from checkpoints import FAMILY_CONFIGS, make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from test_deepseek import make_deepseek
from test_gpt_oss import _reference_model, _save

from moetier import LLM, SamplingParams
from moetier.cli import _build_parser, _engine_options, fit_report, main
from moetier.errors import MoetierError
from moetier.loader.load import read_source
from moetier.models.registry import family_for
from moetier.moe.executor import ResidentExecutor
from moetier.offload import budget
from moetier.offload.budget import GIB, RESERVE_BYTES, expert_layout, host_arena_bytes, parse_size, plan_memory
from moetier.offload.copy_engine import DelayedCopyEngine
from moetier.offload.executor import OffloadedExecutor
from moetier.offload.store import staging_arena_bytes

CONFIGS = Path(__file__).parent.parent / "benchmarks" / "configs"
PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek-v2-group-per_expert", "deepseek-v3-halves-fused",
            "gpt_oss"]


def _checkpoint(name: str, path: Path) -> str:
    if name == "gpt_oss":
        _save(_reference_model(), path)
    elif name.startswith("deepseek-"):
        make_deepseek(name.removeprefix("deepseek-"), path)
    else:
        make_checkpoint(name, path)
    return str(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    return _checkpoint(request.param, tmp_path_factory.mktemp(request.param.replace("-", "_")))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planner_counts_what_the_engine_allocates(family_checkpoint, dtype):
    llm = LLM(family_checkpoint, dtype=dtype, max_model_len=100, max_num_seqs=3, block_size=8)
    engine = llm.engine
    spec, torch_dtype = engine.source.spec, engine.resolved.dtype
    params = {p.data_ptr(): p.numel() * p.element_size() for p in engine.model.parameters()}
    assert sum(budget.non_expert_bytes(spec, torch_dtype).values()) == sum(params.values())
    kv = sum(t.numel() * t.element_size() for layer in engine.runner.kv_cache.layers for t in layer)
    assert budget.kv_cache_bytes(spec, torch_dtype, 100, 3, 8) == kv
    assert budget.kv_cache_token_shapes(spec) == engine.model.kv_cache_token_shapes()
    assert budget.expert_layout(spec, torch_dtype).slot_bytes == engine.executor.layout.slot_bytes


def _tiny_spec():
    config = FAMILY_CONFIGS["qwen3_moe"]().to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]}
    return family_for(config).read_spec(config)


def _mixtral_spec():
    return read_source(CONFIGS / "mixtral-8x7b").spec


@settings(max_examples=80, deadline=None)
@given(a=st.integers(1 << 20, 200 * GIB), b=st.integers(1 << 20, 200 * GIB), big=st.booleans())
def test_slots_are_monotone_in_the_budget(a, b, big):
    spec = _mixtral_spec() if big else _tiny_spec()
    reserve = 0 if not big else RESERVE_BYTES
    low, high = sorted((a, b)) if big else sorted((a // 4096, b // 4096))

    def slots(gpu):
        try:
            return plan_memory(spec, torch.bfloat16, 1024, 4, 16, gpu, reserve=reserve).num_slots
        except MoetierError:
            return 0

    assert slots(low) <= slots(high)
    plan_high = slots(high)
    if plan_high:
        plan = plan_memory(spec, torch.bfloat16, 1024, 4, 16, high, reserve=reserve)
        assert plan.gpu_total <= high
        assert plan.resident == (plan.num_slots == plan.num_experts)


def test_impossible_budgets_fail_clearly():
    spec = _mixtral_spec()
    with pytest.raises(MoetierError, match=r"needs 13\.04 GiB beyond the experts.*budget is 8\.00 GiB"):
        plan_memory(spec, torch.bfloat16, 4096, 16, 16, "8GiB")
    # 14,001,119,232 fixed bytes (13.04 GiB: weights, KV cache, 1.5 GiB + the activations of a 2048-token
    # step) fit in themselves + 400 MiB, beside one 352 MB slot only (< top_k 2)
    with pytest.raises(MoetierError, match="only 1 expert slots .* fewer than the 2 experts a token uses"):
        plan_memory(spec, torch.bfloat16, 4096, 16, 16, 14_001_119_232 + (400 << 20))
    with pytest.raises(MoetierError, match="100 expert slots need .*at most 33 slots"):
        plan_memory(spec, torch.bfloat16, 4096, 16, 16, "24GiB", expert_slots=100)
    # 88 GiB of host store against a 64 GiB cap: as many experts as fit stay in host memory, the rest on disk.
    capped = plan_memory(spec, torch.bfloat16, 4096, 16, 16, "24GiB", "64GiB")
    layout = expert_layout(spec, torch.bfloat16)
    assert 0 < capped.host_experts < capped.num_experts and capped.host_store <= 64 * GIB
    staging = staging_arena_bytes(layout)  # the pinned ring the disk reads land in
    assert capped.host_store == host_arena_bytes(layout, capped.host_experts) + staging
    assert host_arena_bytes(layout, capped.host_experts + 1) + staging > 64 * GIB
    assert plan_memory(spec, torch.bfloat16, 4096, 16, 16, "24GiB", "88GiB").num_slots == 33
    assert plan_memory(spec, torch.bfloat16, 4096, 16, 16, "24GiB", expert_slots=2).num_slots == 2


def test_embedding_on_host_frees_its_bytes():
    spec = read_source(CONFIGS / "qwen3-30b-a3b").spec
    on_gpu = plan_memory(spec, torch.bfloat16, 4096, 16, 16, "12GiB")
    on_host = plan_memory(spec, torch.bfloat16, 4096, 16, 16, "12GiB", embedding_on_host=True)
    assert on_host.host_weights == {"embedding": 622329856} and "embedding" not in on_host.weights
    # the 622,329,856 bytes of the embedding make room for 65 more 9,437,184-byte slots
    assert (on_gpu.num_slots, on_host.num_slots) == (148, 214)


def test_parse_size():
    assert parse_size("24GiB") == 24 << 30
    assert parse_size("40GB") == 40 * 10**9
    assert parse_size("512MiB") == parse_size("512m") == 512 << 20
    assert parse_size("1.5 GiB") == 3 << 29
    assert parse_size("1000") == parse_size(1000) == 1000
    for bad in ["", "24 GiBs", "-1GiB", "0", "GiB", "1e9", True]:
        with pytest.raises(MoetierError):
            parse_size(bad)


# --- `moetier fit` on the benchmark shapes -----------------------------------------------------------
# Mixtral-8x7B bf16, max_model_len 4096, 16 sequences (the engine defaults):
#   embedding = lm_head = 32000 * 4096 * 2 = 262,144,000
#   attention = 32 layers * (2 * 4096*4096 + 2 * 4096*1024) * 2 = 2,684,354,560
#   norms = 65 * 4096 * 2 = 532,480; routers = 32 * 8 * 4096 * 2 = 2,097,152  -> weights 3,211,272,192
#   KV = (256 blocks * 16 seqs + 1 scratch) * 16 tokens * (32 * 2 * 8 * 128 * 2 = 131,072) = 8,592,031,744
#   activations of a 2048-token step = 2048 * (2 * (3 * 4096 + 3 * 14336) + 8 * 4096) * 2 = 587,202,560
#   fixed = weights + KV + 1.5 GiB + activations = 14,001,119,232; slot = 3 * 4096 * 14336 * 2 = 352,321,536
#   24 GiB: (25,769,803,776 - 14,001,119,232) // 352,321,536 = 33 slots of 256 (12.9%)
#   40 GiB: (42,949,672,960 - 14,001,119,232) // 352,321,536 = 82 slots
# Qwen3-30B-A3B bf16, same defaults:
#   embedding = lm_head = 151936 * 2048 * 2 = 622,329,856
#   attention = 48 * ((2 * 2048*4096 + 2 * 2048*512) + 2 * 128) * 2 = 1,811,963,904
#   norms = 97 * 2048 * 2 = 397,312; routers = 48 * 128 * 2048 * 2 = 25,165,824 -> weights 3,082,186,752
#   KV = 65,552 tokens * (48 * 2 * 4 * 128 * 2 = 98,304) = 6,444,023,808
#   activations = 2048 * (8 * (3 * 2048 + 3 * 768) + 8 * 2048) * 2 = 343,932,928
#   12 GiB: (12,884,901,888 - 3,082,186,752 - 6,444,023,808 - 1,610,612,736 - 343,932,928)
#   // (3 * 2048 * 768 * 2 = 9,437,184) = 148 slots of 6144


@pytest.mark.parametrize("config,gpu,weights,kv,slot_bytes,slots,experts", [
    ("mixtral-8x7b", "24GiB", 3_211_272_192, 8_592_031_744, 352_321_536, 33, 256),
    ("mixtral-8x7b", "40GiB", 3_211_272_192, 8_592_031_744, 352_321_536, 82, 256),
    ("qwen3-30b-a3b", "12GiB", 3_082_186_752, 6_444_023_808, 9_437_184, 148, 6144),
])
def test_fit_benchmark_shapes(config, gpu, weights, kv, slot_bytes, slots, experts, capsys):
    report = fit_report(str(CONFIGS / config), gpu, profile={})
    plan = report["plan"]
    assert (plan["non_expert"], plan["kv_cache"], plan["slot_bytes"]) == (weights, kv, slot_bytes)
    assert (plan["num_slots"], plan["num_experts"], plan["resident"]) == (slots, experts, False)
    assert plan["gpu_total"] <= parse_size(gpu) < plan["gpu_total"] + slot_bytes
    roof = report["roofline"]
    assert report["bandwidth"]["source"].startswith("assumed")
    assert roof["copy_bound_tok_s"] < roof["resident_tok_s"] and roof["offloaded_tok_s"] == roof["copy_bound_tok_s"]
    uses = {"mixtral-8x7b": 32 * 2, "qwen3-30b-a3b": 48 * 8}[config]
    assert roof["miss_bytes_per_token"] == int(uses * (1 - slots / experts) * slot_bytes)
    assert main(["fit", str(CONFIGS / config), "--gpu-memory", gpu, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["num_slots"] == slots
    assert main(["fit", str(CONFIGS / config), "--gpu-memory", gpu]) == 0
    assert f"{slots} of {experts} cached" in capsys.readouterr().out


def test_fit_with_a_routing_trace(tmp_path, capsys):
    """Skewed routing of the model's shape: the planned slots hit more than the cached fraction, so
    the copy bound rises; a trace of another shape is a clear error."""
    from moetier.trace.synthetic import generate

    mixtral = str(CONFIGS / "mixtral-8x7b")
    skewed = tmp_path / "skewed.npz"
    generate("lognormal", 32, 8, 2, 400, seed=1, sigma=1.5).save(skewed)
    uniform = fit_report(mixtral, "24GiB", profile={})
    traced = fit_report(mixtral, "24GiB", profile={}, routing_trace=str(skewed))
    assert traced["routing"]["hit_rate"] > uniform["plan"]["cached_fraction"]
    assert traced["roofline"]["copy_bound_tok_s"] > uniform["roofline"]["copy_bound_tok_s"]
    assert traced["roofline"]["miss_bytes_per_token"] == int(
        32 * 2 * traced["routing"]["miss_rate"] * traced["plan"]["slot_bytes"])
    assert main(["fit", mixtral, "--gpu-memory", "24GiB", "--routing-trace", str(skewed)]) == 0
    assert "layer eviction on" in capsys.readouterr().out
    other = tmp_path / "other.npz"
    generate("uniform", 4, 8, 2, 10).save(other)
    assert main(["fit", mixtral, "--gpu-memory", "24GiB", "--routing-trace", str(other)]) == 2
    assert "4 MoE layers x 8 experts, top-2; the model has 32 x 8, top-2" in capsys.readouterr().err
    empty = tmp_path / "empty.npz"
    generate("uniform", 32, 8, 2, 0).save(empty)
    assert main(["fit", mixtral, "--gpu-memory", "24GiB", "--routing-trace", str(empty)]) == 2
    assert "has no tokens" in capsys.readouterr().err


def test_fit_resident_and_errors(capsys):
    report = fit_report(str(CONFIGS / "olmoe-1b-7b"), "24GiB", profile={"device_copy_gbps": 2000.0,
                                                                          "h2d_pinned_gbps": 25.0})
    assert report["plan"]["resident"] and report["plan"]["cached_fraction"] == 1.0
    assert report["bandwidth"]["source"] == "calibration profile"
    assert report["roofline"]["miss_bytes_per_token"] == 0
    assert main(["fit", str(CONFIGS / "mixtral-8x7b"), "--gpu-memory", "8GiB"]) == 2
    assert "beyond the experts" in capsys.readouterr().err
    assert main(["fit", str(CONFIGS / "mixtral-8x7b"), "--gpu-memory", "lots"]) == 2


# --- the engine with gpu_memory ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


def _budget_for(path: str, slots: int) -> int:
    spec = read_source(Path(path)).spec
    plan = plan_memory(spec, torch.float32, 128, 16, 16, 1 << 40, expert_slots=1)
    return plan.reserve + plan.non_expert + plan.kv_cache + slots * plan.slot_bytes + plan.slot_bytes // 2


def test_engine_uses_the_planned_slots_bitwise(qwen3, monkeypatch, tmp_path):
    resident = LLM(qwen3, dtype="float32", max_model_len=128)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = ([resident.score(ids) for ids in PROMPTS], [o.token_ids for o in resident.generate(PROMPTS, params)])
    llm = LLM(qwen3, dtype="float32", max_model_len=128, gpu_memory=_budget_for(qwen3, 5))
    assert llm.engine.resolved.expert_slots == 5 and llm.engine.resolved.memory_plan.num_slots == 5
    assert isinstance(llm.engine.executor, OffloadedExecutor) and llm.engine.executor.pool.num_slots == 5
    copies = DelayedCopyEngine(0.0005)
    llm.engine.executor.copy_engine = copies
    logits = [llm.score(ids) for ids in PROMPTS]
    assert all(torch.equal(a, b) for a, b in zip(logits, ref[0]))
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == ref[1] and copies.violations == []

    roomy = LLM(qwen3, dtype="float32", max_model_len=128, gpu_memory="2GiB")
    assert isinstance(roomy.engine.executor, ResidentExecutor) and roomy.engine.resolved.expert_slots is None
    explicit = LLM(qwen3, dtype="float32", max_model_len=128, gpu_memory=_budget_for(qwen3, 5), expert_slots=3)
    assert explicit.engine.executor.pool.num_slots == 3
    with pytest.raises(MoetierError, match="6 expert slots need"):
        LLM(qwen3, dtype="float32", max_model_len=128, gpu_memory=_budget_for(qwen3, 5), expert_slots=6)
    # A host cap of just the disk reads' staging ring: every expert is served from disk, still bitwise equal.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the disk tier's file stays out of the user's cache
    staging = staging_arena_bytes(roomy.engine.executor.layout)
    on_disk = LLM(qwen3, dtype="float32", max_model_len=128, expert_slots=3, cpu_memory=staging)
    assert on_disk.stats()["disk_experts"] == 24
    assert all(torch.equal(on_disk.score(ids), expected) for ids, expected in zip(PROMPTS, ref[0]))
    assert [o.token_ids for o in on_disk.generate(PROMPTS, params)] == ref[1]
    with pytest.raises(MoetierError, match="below the .* pinned staging ring"):
        LLM(qwen3, dtype="float32", max_model_len=128, expert_slots=3, cpu_memory=staging - 1)
    with pytest.raises(MoetierError, match="not a memory size"):
        LLM(qwen3, gpu_memory="24 gigs")


def test_memory_flags_are_on_the_cli():
    args = _build_parser().parse_args(["generate", "hi", "--gpu-memory", "24GiB", "--cpu-memory", "64GB"])
    options = _engine_options(args)
    assert options["gpu_memory"] == "24GiB" and options["cpu_memory"] == "64GB"
