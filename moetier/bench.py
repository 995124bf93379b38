"""`moetier bench`: prefill and decode throughput, time to first token, peak GPU memory, and the
fraction of the memory-bandwidth roofline reached, printed as JSON.

Roofline of a decode step at batch b: the bytes it must read once from device memory (every
non-expert weight, the lm_head, b embedding rows, the experts the batch activates — under
uniform routing E * (1 - (1 - k/E)^b) per MoE layer — and the batch's KV cache) over the
device bandwidth measured by `moetier calibrate` (a device-to-device copy). The fraction is that
ideal step time over the measured one.

Offloaded experts add the copy bound: the bytes of the experts a step needed and did not have
(its misses, a prefetched expert counting as the miss it would have been) over the measured pinned
copy bandwidth; `copy_efficiency` is that time over the measured step time, and `bound_tok_s` the
lower of the two bounds. Prefetches of wrongly guessed experts are copied bytes (`h2d_bytes_*`)
that count against the efficiency, not for it. The hit rate is set
beside what static pinning and the run's own policy get on the same routing (recorded during the
bench and replayed through the same slot planner).
"""

import os
import time

import torch

from moetier.engine.engine import Engine
from moetier.gpu_memory import process_gpu_bytes
from moetier.llm import LLM
from moetier.offload.budget import parse_size
from moetier.sampling_params import SamplingParams
from moetier.trace.recorder import RoutingRecorder, attach_recorder, engine_trace
from moetier.trace.simulate import access_events, simulate


def expected_active_experts(num_experts: int, top_k: int, batch: int) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_step_bytes(engine: Engine, batch: int, mean_context: float) -> float:
    spec, model = engine.source.spec, engine.model
    embed = model.model.embed_tokens.weight
    dense = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    if spec.tie_word_embeddings:
        dense += embed.numel() * embed.element_size()  # the lm_head reads the whole shared table
    dense += batch * embed.shape[1] * embed.element_size()
    experts = 0.0
    layout = engine.executor.expert_weights.layout
    part_bytes = sum(torch.Size(shape).numel() * layout.dtype.itemsize for shape in layout.part_shapes.values())
    for _ in spec.moe_layer_ids:
        experts += expected_active_experts(spec.moe.num_experts, spec.moe.top_k, batch) * part_bytes
    kv_per_token = sum(t.shape[2:].numel() * t.element_size() for layer in engine.runner.kv_cache.layers for t in layer)
    return dense + experts + batch * mean_context * kv_per_token


def offload_figures(before: dict, after: dict, steps: int, step_s: float, batch: int, h2d_gbps: float | None) -> dict:
    """The offloading counters over `steps` steps of `batch` tokens taking step_s each."""
    def delta(key):
        return after[key] - before[key]

    accesses = delta("hits") + delta("misses")
    copied_per_step = delta("bytes_copied") / steps
    missed_per_step = delta("miss_bytes") / steps
    figures = {
        "hit_rate": round(delta("hits") / accesses, 4) if accesses else None,
        "h2d_bytes_per_step": int(copied_per_step),
        "h2d_bytes_per_token": int(copied_per_step / batch),
        "miss_bytes_per_step": int(missed_per_step),
        "prefetch_used": delta("prefetch_used"),
        "prefetch_loads": delta("prefetch_loads"),
        "prediction_precision": round(delta("guessed_right") / delta("guessed_experts"), 3) if delta("guessed_experts") else None,
        "copy_stall_ms_per_step": round(delta("copy_wait_s") / steps * 1e3, 3),
        "routing_sync_ms_per_step": round(delta("routing_sync_s") / steps * 1e3, 3),
    }
    if h2d_gbps and missed_per_step:
        copy_s = missed_per_step / (h2d_gbps * 1e9)
        figures["copy_bound_tok_s"] = round(batch / copy_s, 2)
        figures["copy_efficiency"] = round(copy_s / step_s, 3)
    return figures


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def measure_prefill(llm: LLM, length: int, h2d_gbps: float | None, repeats: int = 3) -> dict:
    engine = llm.engine
    prompt = _random_prompts(engine.source.spec.vocab_size, 1, length, seed=length)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(prompt, params)  # warm-up: kernels for this shape compiled
    times = []
    before = engine.offload_stats()
    for _ in range(repeats):
        _sync(engine.resolved.device)
        start = time.perf_counter()
        llm.generate(prompt, params)
        _sync(engine.resolved.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    result = {"tokens": length, "ms": round(seconds * 1e3, 2), "tok_s": round(length / seconds, 1)}
    if before is not None:  # per prefill: a step of `length` tokens
        result["offload"] = offload_figures(before, engine.offload_stats(), repeats, seconds, length, h2d_gbps)
    return result


def measure_decode(llm: LLM, batch: int, prompt_len: int, output_len: int, bandwidth_gbps: float | None,
                   h2d_gbps: float | None = None) -> dict:
    engine = llm.engine
    device = engine.resolved.device
    prompts = _random_prompts(engine.source.spec.vocab_size, batch, prompt_len, seed=batch)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up at this batch size
    for prompt in prompts:
        engine.add_request(prompt, params)
    _sync(device)
    start = time.perf_counter()
    first_token_at, started = None, 0
    while engine.has_unfinished():
        outputs = engine.step()
        started += sum(1 for o in outputs if len(o.token_ids) == 1)
        if first_token_at is None and started == batch:
            _sync(device)
            first_token_at = time.perf_counter()
            before = engine.offload_stats()
    _sync(device)
    end = time.perf_counter()
    after = engine.offload_stats()
    steps = output_len - 1
    step_s = (end - first_token_at) / steps
    result = {
        "batch": batch,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "tok_s": round(batch / step_s, 1),
        "step_ms": round(step_s * 1e3, 3),
        "ttft_ms": round((first_token_at - start) * 1e3, 1),
    }
    step_bytes = decode_step_bytes(engine, batch, prompt_len + output_len / 2)
    result["roofline_bytes_per_step"] = int(step_bytes)
    if bandwidth_gbps:
        ideal_s = step_bytes / (bandwidth_gbps * 1e9)
        result["roofline_tok_s"] = round(batch / ideal_s, 1)
        result["roofline_fraction"] = round(ideal_s / step_s, 3)
    if after is not None:
        offload = offload_figures(before, after, steps, step_s, batch, h2d_gbps)
        result["offload"] = offload
        bounds = [result[k] for k in ("roofline_tok_s",) if k in result] + [offload.get("copy_bound_tok_s")]
        bounds = [b for b in bounds if b]
        if bounds:
            result["bound_tok_s"] = min(bounds)
            result["bound_fraction"] = round(result["tok_s"] / min(bounds), 3)
    return result


def run_bench(llm: LLM, batch_sizes: list[int], prompt_len: int, output_len: int, prefill_lens: list[int],
              profile: dict, load_seconds: float) -> dict:
    """Every measurement as one report; `profile` is the machine's calibration (bandwidths)."""
    engine = llm.engine
    device = engine.resolved.device
    bandwidth_gbps, h2d_gbps = profile.get("device_copy_gbps"), profile.get("h2d_pinned_gbps")
    offloaded = engine.offload_stats()
    recorder = attach_recorder(engine) if offloaded else None
    report = {
        "model": str(engine.source.model_dir),
        "pid": os.getpid(),  # to find this process in an NVML log
        "architecture": engine.source.spec.architecture,
        "dtype": str(engine.resolved.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_s": round(load_seconds, 2),
        "device_copy_gbps": bandwidth_gbps,
        "prefill": [measure_prefill(llm, n, h2d_gbps) for n in prefill_lens],
        "decode": [measure_decode(llm, b, prompt_len, output_len, bandwidth_gbps, h2d_gbps) for b in batch_sizes],
    }
    if offloaded:
        report["offload"] = offload_summary(engine, recorder, h2d_gbps)
    if device.type == "cuda":
        report["peak_gpu_bytes_torch_reserved"] = torch.cuda.max_memory_reserved(device)
        report["gpu_bytes_nvml_process"] = process_gpu_bytes()
        budget = engine.config.gpu_memory
        if budget is not None and report["gpu_bytes_nvml_process"] is not None:
            report["gpu_budget_bytes"] = parse_size(budget)
            report["within_gpu_budget"] = report["gpu_bytes_nvml_process"] <= report["gpu_budget_bytes"]
    return report


def offload_summary(engine: Engine, recorder: RoutingRecorder, h2d_gbps: float | None) -> dict:
    """The executor's totals, and the hit rates of static pinning and of the run's policy replayed
    on the routing the bench produced, with the same number of slots (cold start, no prefetch)."""
    stats = engine.executor.stats()
    trace = engine_trace(engine, recorder)
    events = access_events(trace)
    replayed = {}
    for policy in dict.fromkeys(["static", engine.config.eviction]):
        hits, misses = simulate(trace, policy, stats["num_slots"], events)
        replayed[policy] = round(hits / (hits + misses), 4) if hits + misses else None
    keys = ("num_slots", "slot_bytes", "hit_rate", "bytes_copied", "miss_bytes", "prefetch_loads", "prefetch_used",
            "gpu_first_copies",
            "prediction_precision", "prediction_recall", "prefetch_window_s", "expert_copy_s",
            "slot_occupancy", "disk_experts", "disk_direct_io", "disk_bytes_read", "disk_read_s",
            "host_arena_reserved_bytes")
    summary = {"eviction": engine.config.eviction, "predictor": engine.config.predictor, "h2d_pinned_gbps": h2d_gbps,
               **{k: stats[k] for k in keys if k in stats}, "replayed_hit_rate": replayed}
    if stats["disk_read_s"]:
        summary["disk_read_gbps"] = round(stats["disk_bytes_read"] / stats["disk_read_s"] / 1e9, 2)
    return summary
