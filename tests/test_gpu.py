"""The same engine on a CUDA GPU: fp32 logits agree with transformers there, bf16 runs end to end."""

import gc
import weakref

import numpy as np
import pytest
import torch
from checkpoints import FAMILY_CONFIGS, make_checkpoint
from parity import LOGIT_RTOL, assert_greedy_matches

from moetier import LLM, SamplingParams
from moetier.engine.cuda_graphs import DecodeGraphs, PiecewiseDecodeGraphs
from moetier.models.linear import linear
from moetier.offload import executor as executor_module
from moetier.offload.executor import CapturedRound
from moetier.offload.predict import NextGatePredictor
from moetier.offload.prefetch import PrefetchWindow

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_cuda_fp32_matches_transformers(family, tmp_path):
    reference = make_checkpoint(family, tmp_path).cuda()
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", max_model_len=128)
    ids = list(range(10, 60))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids], device="cuda")).logits[0].float()
    err = (llm.score(ids) - theirs).abs().max().item()
    assert err <= LOGIT_RTOL * theirs.abs().max().item()
    assert_greedy_matches(llm, reference.cpu(), ids)


def test_cuda_bf16_batched_generation(tmp_path):
    make_checkpoint("qwen3_moe", tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128)
    outputs = llm.generate([[5, 6, 7], list(range(10, 40))], SamplingParams(max_tokens=16, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [16, 16]
    assert llm.engine.executor.banks[0].bytes_SB.is_cuda


@pytest.mark.parametrize("dtype,window,sinks", [(torch.float32, None, False), (torch.bfloat16, None, False), (torch.float32, 7, True)])
def test_paged_decode_kernel_matches_reference(dtype, window, sinks):
    from moetier.kernels.paged_decode import paged_decode
    from moetier.models.paged_attention import attend, causal_mask

    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, blocks = 16, 4, 128, 16, 64
    k_cache = torch.randn(blocks, block_size, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    ctx = [1, 15, 16, 17, 200, 511]
    tables = torch.stack([torch.randperm(blocks, device="cuda")[:32] for _ in ctx]).to(torch.int32)
    q = torch.randn(len(ctx), heads, dim, device="cuda", dtype=dtype)
    sinks_H = torch.randn(heads, device="cuda") if sinks else None
    out = paged_decode(q, k_cache, v_cache, tables, torch.tensor(ctx, device="cuda", dtype=torch.int32),
                       dim**-0.5, window, sinks_H)
    for b, n in enumerate(ctx):
        keys = k_cache[tables[b].long()].flatten(0, 1)[:n]
        values = v_cache[tables[b].long()].flatten(0, 1)[:n]
        ref = attend(q[b : b + 1].float(), keys.float(), values.float(), causal_mask(1, n, window, "cuda"),
                     dim**-0.5, sinks_H)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[b].float(), ref[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel,token_counts", [("grouped", (1, 7, 300)), ("gemv", (1, 3))])
def test_expert_kernels_match_looped_on_cuda(kernel, token_counts):
    """The sync-free kernels (grouped GEMM; the decode-sized GEMV) against the per-slot loop."""
    from moetier.models.spec import MoESpec, RouterSpec
    from moetier.moe.dispatch import combine, dispatch, weighted_k_sum
    from moetier.moe.experts import ExpertBank, ExpertLayout
    from moetier.moe.grouped import gemv_experts, grouped_experts, looped_experts
    from moetier.moe.router import Routing

    torch.manual_seed(0)
    spec = MoESpec(RouterSpec(64, 8), 384)
    bank = ExpertBank(64, ExpertLayout(512, 384, torch.bfloat16, False), "cuda")
    for tensor in bank.parts.values():
        tensor.normal_(0, 0.05)
    for tokens in token_counts:
        x_TD = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        routing = Routing(torch.rand(tokens, 64, device="cuda").topk(8).indices, torch.rand(tokens, 8, device="cuda"))
        plan = dispatch(x_TD, routing, 64)
        if kernel == "grouped":
            fast = combine(grouped_experts(plan, bank, spec), plan, routing)
        else:
            fast = weighted_k_sum(gemv_experts(x_TD, routing.topk_ids_TK.reshape(-1), bank), routing.topk_weights_TK)
        looped = combine(looped_experts(plan, bank, spec), plan, routing)
        torch.testing.assert_close(fast.float(), looped.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scoring,norm_topk,num_experts,top_k", [
    ("softmax", True, 128, 8), ("softmax", False, 64, 8), ("topk_softmax", False, 32, 4), ("softmax", True, 60, 6)])
def test_fused_router_matches_torch(scoring, norm_topk, num_experts, top_k):
    """The one-kernel softmax/top-k against torch's ops (router._route unfused), on fp32 logits
    (no ties) and on bf16 logits, where ties are common: the kernel takes the lowest id among equal
    scores, so its choice equals torch's up to the order of tied scores."""
    from moetier.kernels.router_topk import softmax_topk
    from moetier.models.spec import RouterSpec
    from moetier.moe.router import _route

    torch.manual_seed(0)
    spec = RouterSpec(num_experts, top_k, scoring=scoring, norm_topk=norm_topk, routed_scaling=2.5)
    for dtype in (torch.float32, torch.bfloat16):
        logits_TE = (torch.randn(300, num_experts, device="cuda") * 2).to(dtype)
        ids_TK, weights_TK = softmax_topk(logits_TE, top_k, scoring == "softmax", norm_topk, spec.routed_scaling)
        ref_ids_TK, ref_weights_TK = _route.__wrapped__(logits_TE, None, spec)
        torch.testing.assert_close(weights_TK, ref_weights_TK, rtol=1e-5, atol=1e-6)
        if dtype == torch.float32:
            assert torch.equal(ids_TK, ref_ids_TK)
        else:  # same set of experts per token, ties at the k-th score aside (the lowest ids win there)
            chosen = ids_TK.sort(dim=1).values
            scores_TE = logits_TE.float()
            kth_TK = scores_TE.gather(1, ids_TK)[:, -1:]
            assert torch.equal(scores_TE.gather(1, ids_TK), scores_TE.gather(1, ref_ids_TK))
            untied = (scores_TE == kth_TK).sum(dim=1) == 1
            assert torch.equal(chosen[untied], ref_ids_TK.sort(dim=1).values[untied])
            assert untied.float().mean() > 0.5


def _eager_qkv_cache(qkv_TC, positions_T, q_w, k_w, spec, rotary, eps):
    """attention.py's unfused ops: (q [T, H, D], k, v [T, K, D])."""
    from moetier.models.norm import rms_norm
    from moetier.models.rope import _cos_sin, _rotate

    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q, k, v = qkv_TC.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    norm = rms_norm.__wrapped__
    if spec.qk_norm == "full":
        q, k = norm(q, q_w, eps), norm(k, k_w, eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q, k, v = q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim)), v.unflatten(-1, (kv_heads, head_dim))
    if spec.qk_norm == "head":
        q, k = norm(q, q_w, eps), norm(k, k_w, eps)
    cos, sin = _cos_sin(positions_T, rotary.inv_freq_on(qkv_TC.device), 1.0, spec.rope.interleaved, qkv_TC.dtype)
    q, k = (_rotate(t, cos, sin, spec.rope.rotary_dim, spec.rope.interleaved) for t in (q, k))
    return q, k, v


@pytest.mark.parametrize("qk_norm,clip,interleaved,rotary_dim,heads,kv_heads,head_dim", [
    ("head", None, False, 128, 32, 4, 128), ("full", 3.0, False, 64, 16, 16, 64), ("none", None, True, 32, 6, 2, 48)])
def test_qkv_cache_kernel_matches_eager_ops(qk_norm, clip, interleaved, rotary_dim, heads, kv_heads, head_dim):
    """The one-kernel norm/clip/rotary/cache write against the eager torch ops it replaces:
    fp32 to rounding; bf16 no less accurate than the eager bf16 ops, both against the same ops in
    fp32 (the kernel rounds where each eager op does, but its cos/sin may differ from torch's by an
    ulp at large angles, which flips some bf16 roundings)."""
    from moetier.kernels.qkv_cache import norm_rotate_cache
    from moetier.models.rope import Rotary
    from moetier.models.spec import AttentionSpec, RopeSpec

    torch.manual_seed(0)
    spec = AttentionSpec("gqa", heads, kv_heads, head_dim, RopeSpec(rotary_dim, 1e6, interleaved=interleaved),
                         head_dim**-0.5, qk_norm=qk_norm, clip_qkv=clip)
    rotary, eps = Rotary(spec.rope), 1e-6
    norm_sizes = (head_dim, head_dim) if qk_norm == "head" else (heads * head_dim, kv_heads * head_dim)
    qkv32_TC = torch.randn(5, (heads + 2 * kv_heads) * head_dim, device="cuda") * 2
    q_w32, k_w32 = (torch.rand(size, device="cuda") + 0.5 for size in norm_sizes)
    positions_T = torch.tensor([0, 1, 17, 3001, 40000], device="cuda")
    slots_T = torch.tensor([5, 9, 30, 31, 63], device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        qkv_TC, q_w, k_w = (t.to(dtype) for t in (qkv32_TC, q_w32, k_w32))
        k_cache, v_cache = (torch.zeros(4, 16, kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        norms = (q_w, k_w) if qk_norm != "none" else (None, None)
        q_THD = norm_rotate_cache(qkv_TC, positions_T, slots_T, k_cache, v_cache, spec,
                                  rotary.inv_freq_on(torch.device("cuda")), 1.0, *norms, eps)
        ours = (q_THD, k_cache.view(-1, kv_heads, head_dim)[slots_T], v_cache.view(-1, kv_heads, head_dim)[slots_T])
        eager = _eager_qkv_cache(qkv_TC, positions_T, q_w, k_w, spec, rotary, eps)
        assert torch.equal(ours[2], eager[2])  # v: clipped at most, bit for bit
        if dtype == torch.float32:
            for mine, ref in zip(ours, eager):
                torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
            continue
        exact = _eager_qkv_cache(qkv_TC.float(), positions_T, q_w.float(), k_w.float(), spec, rotary, eps)
        for mine, ref, truth in zip(ours[:2], eager[:2], exact[:2]):
            torch.testing.assert_close(mine.float(), ref.float(), rtol=1.6e-2, atol=1.6e-2)
            assert (mine.float() - truth).abs().mean() <= 1.1 * (ref.float() - truth).abs().mean()


def test_elementwise_kernels_match_eager_ops():
    """The Triton norm, SwiGLU and k-weighted sum against the eager torch ops they stand in for: fp32
    to rounding, bf16 close and no less accurate than the eager bf16 ops (both against fp32)."""
    from moetier.kernels import moe_elementwise, rms_norm
    from moetier.models.norm import add_rms_norm
    from moetier.moe.dispatch import _weighted_k_sum

    torch.manual_seed(0)
    x32, residual32, weight32 = torch.randn(300, 2048, device="cuda"), torch.randn(300, 2048, device="cuda"), torch.rand(2048, device="cuda") + 0.5
    gate_up32, out32, weights_TK = torch.randn(300, 2 * 768, device="cuda") * 3, torch.randn(40 * 8, 2048, device="cuda"), torch.rand(40, 8, device="cuda")
    silu_mul = lambda t: torch.nn.functional.silu(t[:, :768]) * t[:, 768:]  # noqa: E731
    cases = [  # (kernel, eager reference, fp32 inputs)
        (lambda x, r, w: rms_norm.rms_norm(x, w, 1e-6, r), lambda x, r, w: add_rms_norm.__wrapped__(x, r, w, 1e-6), (x32, residual32, weight32)),
        (moe_elementwise.silu_mul, silu_mul, (gate_up32,)),
        (lambda o: moe_elementwise.weighted_k_sum(o, weights_TK), lambda o: _weighted_k_sum(o, weights_TK), (out32,)),
    ]
    for kernel, eager, inputs32 in cases:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [t.to(dtype) for t in inputs32]
            ours, ref = kernel(*inputs), eager(*inputs)
            ours, ref, exact = (t if isinstance(t, tuple) else (t,) for t in (ours, ref, eager(*[t.float() for t in inputs])))
            for mine, theirs, best in zip(ours, ref, exact):
                if dtype == torch.float32:
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
                else:  # a partial sum rounded the other way is an ulp at its size (up to ~8 here)
                    torch.testing.assert_close(mine.float(), theirs.float(), rtol=1.6e-2, atol=6.3e-2)
                    assert (mine.float() - best).abs().mean() <= 1.1 * (theirs.float() - best).abs().mean() + 1e-9


@pytest.mark.parametrize("id_dtype, num_experts", [(torch.uint8, 128), (torch.int16, 384)])
def test_replay_rows_kernel_matches_torch_gather(id_dtype, num_experts):
    """Replayed routing's fused gather: the same ids and weights as the torch index and casts, with the
    cursor wrapping past the trace's end and steps of 1 to 600 tokens."""
    from moetier.kernels.replay_rows import replay_rows

    generator = torch.Generator().manual_seed(0)
    ids_NK = torch.randint(0, num_experts, (1000, 8), generator=generator).to(id_dtype).cuda()
    weights_NK = torch.rand(1000, 8, generator=generator).half().cuda()
    for start, tokens in ((0, 1), (995, 8), (640, 600), (999, 3)):
        cursor = torch.tensor(start, device="cuda")
        rows_T = (cursor + torch.arange(tokens, device="cuda")) % 1000
        ids_TK, weights_TK = replay_rows(ids_NK, weights_NK, cursor, tokens)
        assert ids_TK.dtype == torch.int64 and weights_TK.dtype == torch.float32
        assert torch.equal(ids_TK, ids_NK[rows_T].long()) and torch.equal(weights_TK, weights_NK[rows_T].float())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(dtype, tmp_path):
    make_checkpoint("qwen3_moe", tmp_path)
    prompts = [[5, 6, 7], list(range(10, 40)), list(range(50, 55))]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    graphed = LLM(str(tmp_path), dtype=dtype, device="cuda", max_model_len=128, max_num_seqs=4)
    eager = LLM(str(tmp_path), dtype=dtype, device="cuda", max_model_len=128, max_num_seqs=4, cuda_graphs=False)
    if dtype == "bfloat16":  # grouped_mm serves bf16 on sm80+, so whole decode steps are captured
        assert graphed.engine.executor.sync_free
    # fp32 experts run a looped kernel that syncs: the pieces between expert calls are captured instead
    whole = graphed.engine.executor.sync_free
    assert type(graphed.engine.runner.graphs) is (DecodeGraphs if whole else PiecewiseDecodeGraphs)
    with_graphs, without = graphed.generate(prompts, params), eager.generate(prompts, params)
    assert [o.token_ids for o in with_graphs] == [o.token_ids for o in without]


def test_graphed_engine_freezes_the_collector_and_a_dropped_engine_is_still_collected(tmp_path):
    """After capture every live object is frozen (a full collection in decode scans only what came since),
    and an engine dropped before the next capture, reference cycles and all, is collected then."""
    make_checkpoint("qwen3_moe", tmp_path)
    first = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128, expert_slots=6)
    assert gc.get_freeze_count() > 10_000  # torch's and the engine's objects
    executor = weakref.ref(first.engine.executor)
    first.engine.executor.self_cycle = first.engine.executor  # kept alive by a cycle alone once dropped
    del first
    assert executor() is not None  # frozen: no collection frees it
    second = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128, expert_slots=6)
    assert executor() is None and gc.get_freeze_count() > 10_000
    assert isinstance(second.engine.runner.graphs, PiecewiseDecodeGraphs)


@pytest.mark.parametrize("slots", [1, 3, 6, 12, 24])
@pytest.mark.parametrize("predictor", ["none", "gate"])
def test_offloaded_bf16_equals_resident_bitwise_on_cuda(slots, predictor, tmp_path, monkeypatch):
    """The real copy stream and events: tiny pools (one or two slots per layer of 3) force refills of
    slots a kernel just read; two spare slots (whatever the pool's size) refilled by each step's first
    misses before its planning; larger pools run the prefill overlap (hits compute while misses stream)
    and the next-layer prefetch: whole layers after spread routing, or (gate) every guess of the
    predictor, its precision and the measured window ignored."""
    monkeypatch.setattr(executor_module, "OVERLAP_MIN_TOKENS", 1)  # the overlap rounds at GEMV sizes too
    monkeypatch.setattr(executor_module, "SPLIT_MIN_LOADS", 1)  # (captured GEMV steps split at the last copy)
    monkeypatch.setattr(executor_module, "spare_slots", lambda slots, experts: 2 if slots < experts else 0)
    if predictor == "gate":
        monkeypatch.setattr(executor_module, "PREDICTION_MIN_PRECISION", 0.0)
        monkeypatch.setattr(PrefetchWindow, "depth", lambda self, precision: 1000)
    make_checkpoint("qwen3_moe", tmp_path)
    prompts = [[5, 6, 7], list(range(10, 40)), list(range(50, 55)), [9] * 12, [70, 71], list(range(80, 101))]
    params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=2)
    resident = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128, max_num_seqs=8)
    offloaded = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128, max_num_seqs=8,
                    expert_slots=slots, predictor=predictor)
    assert isinstance(offloaded.engine.runner.graphs, PiecewiseDecodeGraphs)
    assert offloaded.engine.executor.copy_engine.memcpy is not None  # the runtime's cudaMemcpyAsync copies
    ids = list(range(10, 70))
    assert torch.equal(offloaded.score(ids), resident.score(ids))
    # decode through the piecewise graphs (6 sequences in the bucket of 8: grouped experts, padding
    # rows the executor never sees): the same tokens and log-probabilities, bit for bit, as the
    # resident whole-step graphs
    ours, theirs = offloaded.generate(prompts, params), resident.generate(prompts, params)
    assert [(o.token_ids, o.logprobs) for o in ours] == [(o.token_ids, o.logprobs) for o in theirs]
    # GEMV-sized buckets: a full one (1 or 4 sequences) replays a layer's captured expert compute once
    # its experts are resident, or split at its last copy (the run returns None); 3 sequences in the
    # bucket of 4 compute eagerly
    # A full grouped bucket (8 sequences) replays its layers' captured round graphs, one per round.
    # Every expert call of the graphs reads its routing (and the guess) from the mailbox its graph writes.
    graphed_calls = [call for calls in offloaded.engine.runner.graphs.calls.values() for call in calls]
    assert all(call.published is not None and (call.published.guess is None) == (call.guess_TK is None)
               for call in graphed_calls)
    executor, replayed, rounds_captured, splits, published_calls = offloaded.engine.executor, [], [], [], []
    run, replay_step = executor.run, executor._replay_step

    def recording_run(layer, x_TD, routing, guess_TK=None, compute=None, published=None):
        y_TD = run(layer, x_TD, routing, guess_TK, compute, published)
        replayed.append(y_TD is None)
        rounds_captured.append(isinstance(compute, CapturedRound))
        published_calls.append(published is not None)
        return y_TD

    monkeypatch.setattr(executor, "run", recording_run)

    def recording_replay_step(captured, layer, parts):
        splits.append(len(parts) > 1)
        replay_step(captured, layer, parts)

    monkeypatch.setattr(executor, "_replay_step", recording_replay_step)
    for group in ([prompts[1]], prompts[:3], prompts[2:6], prompts + [[33, 34], list(range(60, 75))]):
        ours, theirs = offloaded.generate(group, params), resident.generate(group, params)
        assert [(o.token_ids, o.logprobs) for o in ours] == [(o.token_ids, o.logprobs) for o in theirs]
    assert any(rounds_captured) and any(published_calls)
    if slots == 1 or slots >= 12:  # one slot never holds a step's two experts; 12 hold most layers' steps
        # split at the last copy where steps still copy (24 slots hold every expert after the first run)
        assert any(replayed) == (slots >= 12) and any(splits) == (slots == 12)
    stats = offloaded.stats()
    copies = stats["misses"] - stats["prefetch_used"] + stats["prefetch_loads"]
    assert stats["misses"] > 0 and stats["bytes_copied"] == copies * stats["slot_bytes"]
    if predictor == "none":  # whole next layers (8 experts) after spread steps: in one pass when all 24 fit,
        # else behind a step's last round, into the slots of the rounds before (none when one slot is the pool)
        assert (stats["prefetch_used"] > 0) == (slots > 1) or slots == 12  # 12: as the routing falls
    elif slots >= 12:  # guesses are made where a step fits in one round (about 0.9 right on CPU), and used;
        # with 6 slots (2 a layer: the layer-aware policy borrows no more) every step runs in rounds
        assert stats["prefetch_used"] > 0 and stats["prediction_precision"] > 0.5 and stats["expert_copy_s"] > 0
    if predictor == "none" and 1 < slots < 24:  # the graphs' first-miss kernels copied into spare slots (of the
        # GEMV-sized buckets; a pool of one slot has none free when a graph launches)
        assert stats["gpu_first_copies"] > 0


def test_routing_mailbox_publishes_from_a_graph(monkeypatch):
    """A graph's publish kernels write their ids into pinned host memory: each armed replay's ids (padding
    rows ignored), int64 ids below 2**31 intact; a region no launched kernel writes raises once the GPU idles."""
    from moetier.kernels import routing_mailbox

    mailbox = routing_mailbox.RoutingMailbox(4 * 8 + 16, torch.device("cuda"))
    ids_TK = torch.zeros(4, 8, dtype=torch.int64, device="cuda")
    guess_TK = torch.zeros(4, 8, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routing, guess = mailbox.publish(ids_TK), mailbox.publish(guess_TK[:, :4].contiguous())
    for _ in range(3):
        ids_TK.copy_(torch.randint(0, 2**31 - 1, (4, 8)))
        guess_TK.copy_(torch.randint(0, 128, (4, 8)))
        mailbox.arm()
        graph.replay()
        assert mailbox.read(routing, 3 * 8).tolist() == ids_TK[:3].flatten().tolist()
        assert mailbox.read(guess, 16).tolist() == guess_TK[:, :4].flatten().tolist()
    with pytest.raises(ValueError, match="holds"):
        mailbox.publish(ids_TK)
    monkeypatch.setattr(routing_mailbox, "IDLE_CHECK_S", 0.01)
    mailbox.arm()
    with pytest.raises(RuntimeError, match="never published"):
        mailbox.read(routing, 8)


def test_first_miss_copy_kernel_copies_what_the_planner_books():
    """From a graph, the kernel copies the smallest routed expert that its command's table lacks (of the
    first `count` ids) from the pinned arena into the commanded slot, byte for byte, and nothing when every
    routed expert is resident, the slot is -1 or the expert is on disk; the planner's claim_free books the
    same expert into the same slot."""
    from moetier.kernels.first_copy import FirstMissCopy
    from moetier.offload.arena import HostArena
    from moetier.offload.cache import LRU
    from moetier.offload.planner import SlotPlanner

    experts, slot_bytes, slots = 8, 4096 + 16, 4
    arena = HostArena(1 << 14, pin=True)  # several chunks: offsets from the lowest
    buffers = [arena.allocate(slot_bytes) for _ in range(experts)]
    for e, buffer in enumerate(buffers):
        buffer.copy_(torch.randint(0, 256, (slot_bytes,), dtype=torch.uint8))
    rows = {0: [None if e == 6 else buffers[e] for e in range(experts)]}  # MoE layer 0; expert 6 on disk
    bank_SB = torch.zeros(slots, slot_bytes, dtype=torch.uint8, device="cuda")
    copier = FirstMissCopy(rows, arena.chunks, bank_SB)
    ids_TK = torch.zeros(2, 4, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        copier.capture(0, ids_TK)
    for routed, count, resident, expected in (
            ([3, 1, 5, 7, 2, 0, 4, 6], 8, {0: 0, 3: 1}, 1),  # 0 and 3 held: 1 is the first missing
            ([3, 1, 5, 7, 2, 0, 4, 6], 4, {1: 0, 3: 1}, 5),  # the first row's ids only
            ([3, 1, 3, 1, 0, 0, 0, 0], 4, {1: 0, 3: 1}, None),  # every expert held
            ([6, 7, 6, 7, 0, 0, 0, 0], 4, {7: 0}, None),  # 6, on disk, is first: nothing
            ([5, 7, 5, 7, 0, 0, 0, 0], 4, {}, -1)):  # the slot is -1
        planner = SlotPlanner(slots, LRU())
        for e, slot in resident.items():
            planner.claim_free(0, [e])  # the lowest free slots, in that order
        table_E = np.full(experts, -1, dtype=np.int64)
        table_E[list(resident)] = list(resident.values())
        needed = sorted(set(routed[:count]))
        slot = -1 if expected == -1 else planner.free[0]
        copier.command(0, slot, count, table_E)
        bank_SB.zero_()
        ids_TK.copy_(torch.tensor(routed).view(2, 4))
        graph.replay()
        torch.cuda.synchronize()
        filled = [s for s in range(slots) if bank_SB[s].any()]
        if expected is None or expected == -1:
            assert filled == []
            continue
        assert filled == [slot] and torch.equal(bank_SB[slot].cpu(), buffers[expected])
        assert planner.claim_free(0, needed)[0] == (expected, slot)


def test_next_gate_guess_is_the_next_routers_top_k_on_cuda():
    """The predictor's one-kernel top-k (router_topk) picks what torch.topk picks (no ties in random logits)."""
    torch.manual_seed(0)
    router = torch.nn.Module()
    router.weight = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    router.spec = type("Spec", (), {"top_k": 6})()
    x_TD = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    guess_TK = NextGatePredictor({0: None, 1: router}).predict(0, x_TD)
    expected_TK = torch.topk(linear(x_TD, router.weight).float(), 6, dim=-1).indices
    assert torch.equal(guess_TK.sort(dim=-1).values, expected_TK.sort(dim=-1).values)
