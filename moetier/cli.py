"""moetier command line: generate | chat | serve | eval-ppl | bench | calibrate | fit.

Every user mistake surfaces as one line on stderr and exit code 2, never a traceback.
"""

import argparse
import logging
import sys

from moetier.errors import MoetierError


def _engine_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", help="checkpoint directory or Hub id already in the local HF cache "
                   "(default: the small MoE embedded in moetier)")
    g.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), float32, bfloat16 or float16")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from config.json alone (for benchmarks)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens "
                   "(default: min(model limit, 4096)); sizes the KV cache")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together; sizes the KV cache")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step; longer prompts are prefilled in chunks")
    g.add_argument("--seed", type=int, default=0, help="seed for dummy weights")
    g.add_argument("--expert-slots", type=int, help="offload routed experts to host memory and cache them in "
                   "this many device slots shared by all MoE layers (default: every expert resident)")
    g.add_argument("--eviction", default="layer", choices=["layer", "lru", "lfu", "static"],
                   help="with offloading: which cached expert gives up its slot (layer: the one whose layer "
                   "comes round again last, the default; static pins the first slots - top_k experts; a "
                   "global LRU over layer sweeps keeps exactly the experts needed last)")
    g.add_argument("--predictor", default="gate", choices=["gate", "none"],
                   help="with offloading: how the next MoE layer's experts are guessed, to copy them while "
                   "this layer computes (gate: that layer's router on this layer's input; none: no guess)")
    g.add_argument("--gpu-memory", help="device memory budget, e.g. 24GiB or 40GB: weights, KV cache, a reserve "
                   "and as many expert slots as fit (offloading only when not every expert fits; with "
                   "--expert-slots: checks that they fit)")
    g.add_argument("--cpu-memory", help="cap on the host memory of the offloaded experts (pinned arena), e.g. 64GiB")
    g.add_argument("-v", "--verbose", action="store_true", help="log what was resolved and loaded")
    return p


def _sampling_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    g.add_argument("--min-tokens", type=int, default=0, help="new tokens before eos/stop may end the output")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this much probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    g.add_argument("--sample-seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    return p


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetier", description="Fast Mixture-of-Experts inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    parents = [_engine_flags(), _sampling_flags()]
    gen = sub.add_parser("generate", parents=parents, help="complete a prompt, streaming to the terminal")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--stats", action="store_true", help="print the expert cache's counters afterwards (stderr)")
    sub.add_parser("chat", parents=parents, help="interactive chat with the model's chat template")
    srv = sub.add_parser("serve", parents=[_engine_flags()], help="OpenAI-compatible HTTP server "
                         "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--served-model-name", help="the model name clients send (default: --model, "
                     "or the checkpoint directory's name)")
    srv.add_argument("--max-queue", type=int, default=256, help="sequences that may wait beyond the "
                     "--max-num-seqs running ones; more are answered with HTTP 429")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds that requests in flight "
                     "get to finish after SIGINT/SIGTERM before they are cancelled")
    bench = sub.add_parser("bench", parents=[_engine_flags()], help="prefill/decode throughput and roofline, as JSON")
    bench.add_argument("--batch-sizes", default="1,8,64", help="decode batch sizes, comma-separated")
    bench.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of each decode request")
    bench.add_argument("--output-len", type=int, default=128, help="new tokens of each decode request")
    bench.add_argument("--prefill-lens", default="512,2048", help="single-prompt prefill lengths, comma-separated")
    bench.add_argument("--routing", default="router", help="router (the model's own), replay:TRACE.npz (a trace "
                       "of the same routing shape, cycled) or synthetic:uniform|lognormal|markov|hotspot")
    sub.add_parser("calibrate", help="measure copy and memory bandwidths of this machine; saves a profile")
    fit = sub.add_parser("fit", help="from config.json alone: the memory plan for a GPU budget (expert slots, "
                         "resident or offloaded) and a decode roofline")
    fit.add_argument("fit_model", metavar="MODEL", help="checkpoint directory (or Hub id in the local cache) "
                     "with a config.json; no weights are read")
    fit.add_argument("--gpu-memory", required=True, help="device memory budget, e.g. 24GiB, 40GB")
    fit.add_argument("--cpu-memory", help="host memory cap for the offloaded experts")
    fit.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), float32, bfloat16 or float16")
    fit.add_argument("--max-model-len", type=int, help="as for the engine (default: min(model limit, 4096))")
    fit.add_argument("--max-num-seqs", type=int, default=16, help="as for the engine")
    fit.add_argument("--expert-slots", type=int, help="check that this many slots fit instead of choosing")
    fit.add_argument("--context", type=int, default=512, help="context tokens read per decode step in the roofline")
    fit.add_argument("--routing-trace", help="a routing trace (.npz, `moetier trace record` or a donor's) of the "
                     "same routing shape: the copy bound uses the miss rate its decode steps get in the planned "
                     "slots (layer-aware eviction) instead of uniform routing's")
    fit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ppl = sub.add_parser("eval-ppl", parents=[_engine_flags()], help="sliding-window perplexity on a text")
    ppl.add_argument("--text", help="a UTF-8 text file (default: the held-out split of the corpus recipe, "
                     "rebuilt from this Python's standard library)")
    ppl.add_argument("--window", type=int, help="context tokens per window (default: max-model-len - 1)")
    ppl.add_argument("--stride", type=int, help="tokens between windows (default: window / 2)")
    ppl.add_argument("--limit-tokens", type=int, help="score only the first N tokens of the text")
    _add_trace_parser(sub)
    return parser


def _add_trace_parser(sub) -> None:
    trace = sub.add_parser("trace", help="routing traces: record, analyze, simulate eviction policies")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    rec = tsub.add_parser("record", parents=[_engine_flags()], help="record a model's routing over a text or prompts")
    src = rec.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text, run teacher-forced in windows (default: the held-out split "
                     "of the corpus recipe)")
    src.add_argument("--prompts", help="a file of prompts, one per non-empty line")
    rec.add_argument("--max-tokens", type=int, default=8192, help="text tokens to record at most")
    rec.add_argument("--window", type=int, help="tokens per text window (default: min(512, max-model-len) "
                     "minus --generate)")
    rec.add_argument("--generate", type=int, default=16, help="greedy decode tokens after each window or prompt "
                     "(decode-phase routing)")
    rec.add_argument("--out", required=True, help="the .npz trace to write")
    ana = tsub.add_parser("analyze", help="markdown summary and PNG plots of a trace")
    ana.add_argument("trace", help="a .npz trace from `moetier trace record`")
    ana.add_argument("--out", required=True, help="directory for summary.md and the plots")
    sim = tsub.add_parser("simulate", help="replay a trace through the runtime's eviction policies, with Belady")
    sim.add_argument("trace", help="a .npz trace from `moetier trace record`")
    sim.add_argument("--cache-fraction", default="0.1,0.25,0.5",
                     help="device slots as fractions of all routed experts, comma-separated")
    sim.add_argument("--policy", default="lru,lfu,static,layer", help="eviction policies, comma-separated")
    sim.add_argument("--phase", default="all", choices=["all", "prefill", "decode"], help="tokens to replay")
    sim.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    syn = tsub.add_parser("synth", help="a seeded synthetic routing trace (uniform, lognormal, markov, hotspot)")
    syn.add_argument("--kind", required=True, choices=["uniform", "lognormal", "markov", "hotspot"])
    syn.add_argument("--layers", type=int, help="MoE layers (default: the --fit trace's)")
    syn.add_argument("--experts", type=int, help="routed experts per layer (default: the --fit trace's)")
    syn.add_argument("--top-k", type=int, help="experts per token (default: the --fit trace's)")
    syn.add_argument("--tokens", type=int, help="tokens to generate (default: the --fit trace's, else 4096)")
    syn.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--fit", help="a donor .npz trace: its shape, and for lognormal/markov fitted parameters")
    syn.add_argument("--sigma", type=float, help="lognormal/markov: log-popularity spread")
    syn.add_argument("--concentration", type=float, help="markov: inter-layer affinity strength")
    syn.add_argument("--hot-experts", type=int, help="hotspot: size of the popular set")
    syn.add_argument("--hot-prob", type=float, help="hotspot: share of the weight on the popular set")
    syn.add_argument("--period", type=int, help="hotspot: tokens between rotations of the popular set")
    syn.add_argument("--out", required=True, help="the .npz trace to write")


def _engine_options(args) -> dict:
    return dict(
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        expert_slots=args.expert_slots,
        eviction=args.eviction,
        predictor=args.predictor,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
    )


def _sampling_params(args):
    from moetier.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def _print_delta(_index, output) -> None:
    sys.stdout.write(output.new_text)
    sys.stdout.flush()


def _generate(args) -> None:
    from moetier.llm import LLM

    params = _sampling_params(args)
    llm = LLM(args.model, **_engine_options(args))
    if args.chat:
        [output] = llm.chat([{"role": "user", "content": args.prompt}], params, on_output=_print_delta)
    else:
        sys.stdout.write(args.prompt)
        [output] = llm.generate(args.prompt, params, on_output=_print_delta)
    sys.stdout.write("\n")
    if args.stats:
        print(stats_table(llm.stats(), len(output.prompt_token_ids) + len(output.token_ids)), file=sys.stderr)


def stats_table(stats: dict, tokens: int) -> str:
    """The expert executor's counters as a small table; per token over every token the model computed."""
    if stats.get("executor") != "offloaded":
        return "experts: resident (every expert on the device; nothing copied)"
    per_token = max(tokens, 1)
    lines = [
        f"experts: offloaded, {stats['num_slots']} device slots of {stats['slot_bytes'] / 2**20:.2f} MiB",
        f"hit rate {stats['hit_rate']:.3f} ({stats['hits']} hits, {stats['misses']} misses) over {tokens} tokens",
        (f"host-to-device {stats['bytes_copied'] / 2**20:.1f} MiB ({stats['bytes_copied'] / per_token / 2**20:.2f} "
         f"MiB/token), copy wait {stats['copy_wait_s'] * 1e3:.1f} ms ({stats['copy_wait_s'] * 1e3 / per_token:.3f} "
         f"ms/token), routing read on the host {stats['routing_sync_s'] * 1e3 / per_token:.3f} ms/token"),
        (f"experts copied a layer ahead {stats['prefetch_loads']}, used {stats['prefetch_used']}; first misses "
         f"copied by the GPU {stats['gpu_first_copies']}; slot occupancy {stats['slot_occupancy']:.2f}"),
        _prediction_line(stats),
        "layer  hits  misses  hit rate",
    ]
    for layer, counts in stats["layers"].items():
        total = counts["hits"] + counts["misses"]
        lines.append(f"{layer:>5}  {counts['hits']:>4}  {counts['misses']:>6}  {counts['hits'] / total if total else 0:.3f}")
    return "\n".join(lines)


def _prediction_line(stats: dict) -> str:
    if stats["prediction_precision"] is None:
        return "next-layer prediction: off or no guess scored"
    window = stats["prefetch_window_s"]
    return (f"next-layer prediction: precision {stats['prediction_precision']:.3f}, recall "
            f"{stats['prediction_recall']:.3f}; copy window {window * 1e3 if window else 0:.3f} ms, one expert copy "
            f"{(stats['expert_copy_s'] or 0) * 1e3:.3f} ms")


def _chat(args) -> None:
    from moetier.llm import LLM

    params = _sampling_params(args)
    llm = LLM(args.model, **_engine_options(args))
    history: list[dict] = []
    print("moetier chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        [output] = llm.chat(history, params, on_output=_print_delta)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": output.text})


def _serve(args) -> None:
    from moetier.config import EngineConfig
    from moetier.engine.engine import Engine

    try:
        from moetier.serve.app import serve
    except ImportError as e:
        raise MoetierError(f"serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None
    if not 0 <= args.port <= 65535:
        raise MoetierError("--port must be in [0, 65535]")
    if args.max_queue < 0:
        raise MoetierError("--max-queue must be >= 0")
    engine = Engine(EngineConfig(model=args.model, **_engine_options(args)))
    name = args.served_model_name or args.model or engine.source.model_dir.name
    serve(engine, name, args.host, args.port, args.max_queue, args.shutdown_timeout, access_log=args.verbose)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise MoetierError(f"expected comma-separated integers, got {text!r}") from None


def _bench(args, prepare=None) -> None:
    """`moetier bench`; `prepare(llm)` lets a baseline script change the engine before measuring."""
    import json
    import time

    import torch

    from moetier.bench import run_bench
    from moetier.config import resolve_device
    from moetier.llm import LLM
    from moetier.offload.calibrate import load_or_calibrate

    batch_sizes, prefill_lens = _int_list(args.batch_sizes), _int_list(args.prefill_lens)
    options = _engine_options(args)
    options["max_num_seqs"] = max(batch_sizes)
    options["max_model_len"] = args.max_model_len or max(prefill_lens + [args.prompt_len]) + args.output_len + 1
    options["max_num_batched_tokens"] = max(args.max_num_batched_tokens, *prefill_lens)
    # The machine's calibration comes before the model: its 1 GiB buffers would not fit under the
    # allocator cap of a --gpu-memory budget, and their cached blocks are handed back before it.
    profile = {}
    if resolve_device(args.device).type == "cuda":
        profile = load_or_calibrate()
        torch.cuda.empty_cache()
    start = time.perf_counter()
    llm = LLM(args.model, **options)
    load_seconds = time.perf_counter() - start
    if prepare is not None:
        prepare(llm)
    if args.routing != "router":
        from moetier.trace.replay import replay_routing, routing_trace_for

        replay_routing(llm.engine, routing_trace_for(llm.engine, args.routing))
    report = run_bench(llm, batch_sizes, args.prompt_len, args.output_len, prefill_lens, profile, load_seconds)
    print(json.dumps(report, indent=1))


def _calibrate(args) -> None:
    import json

    from moetier.offload.calibrate import calibrate, profile_path, save

    print(json.dumps(save(calibrate()), indent=1))
    print(f"saved to {profile_path()}", file=sys.stderr)


def fit_report(model: str, gpu_memory: str, cpu_memory: str | None = None, dtype: str = "auto",
               max_model_len: int | None = None, max_num_seqs: int = 16, expert_slots: int | None = None,
               context: int = 512, profile: dict | None = None, routing_trace: str | None = None) -> dict:
    """`moetier fit` as a dict: the memory plan and the batch-1 decode roofline (config.json only;
    with routing_trace, the copy bound at the miss rate that trace's decode steps simulate to)."""
    import json

    import torch

    from moetier.config import EngineConfig, resolve_dtype
    from moetier.loader.load import read_source
    from moetier.loader.resolve import resolve_model_dir
    from moetier.offload.budget import bandwidths, decode_roofline, plan_memory
    from moetier.offload.calibrate import profile_path

    config = EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          expert_slots=expert_slots, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
    source = read_source(resolve_model_dir(model))
    spec = source.spec
    torch_dtype = resolve_dtype(dtype, spec, torch.device("cuda"))  # planned for a GPU, wherever fit runs
    length = max_model_len or min(spec.max_position, 4096)
    if length > spec.max_position:
        raise MoetierError(f"max_model_len {length} exceeds the model's {spec.max_position} positions")
    plan = plan_memory(spec, torch_dtype, length, max_num_seqs, config.block_size, gpu_memory, cpu_memory,
                       expert_slots=expert_slots)
    if profile is None and profile_path().is_file():
        profile = json.loads(profile_path().read_text())
    bw = bandwidths(profile)
    routing = {"source": "uniform"}
    if routing_trace is not None and not plan.resident:
        routing = simulated_routing(routing_trace, spec, plan.num_slots)
    return {
        "model": str(source.model_dir), "architecture": spec.architecture,
        "dtype": str(torch_dtype).removeprefix("torch."), "max_model_len": length, "max_num_seqs": max_num_seqs,
        "plan": plan.to_dict(), "bandwidth": bw, "routing": routing,
        "roofline": decode_roofline(spec, torch_dtype, plan, bw["device_gbps"], bw["h2d_pinned_gbps"], context,
                                    routing.get("miss_rate")),
    }


def simulated_routing(path: str, spec, num_slots: int, policy: str = "layer") -> dict:
    """The hit rate a routing trace's decode steps (all its steps, if it has none) get in num_slots
    slots, through the runtime's planner and policy; the trace must have the model's routing shape."""
    from moetier.trace.format import load_trace, require_routing_shape
    from moetier.trace.simulate import select_phase, simulate

    trace = load_trace(path)
    require_routing_shape(trace, (len(spec.moe_layer_ids), spec.moe.num_experts, spec.moe.top_k), path)
    decode = select_phase(trace, "decode")
    steps = decode if decode.num_tokens else trace
    hits, misses = simulate(steps, policy, num_slots)
    return {"source": str(path), "policy": policy, "tokens": steps.num_tokens,
            "hit_rate": round(hits / (hits + misses), 4), "miss_rate": misses / (hits + misses)}


def _fit(args) -> None:
    import json

    from moetier.offload.budget import gib

    report = fit_report(args.fit_model, args.gpu_memory, args.cpu_memory, args.dtype, args.max_model_len,
                        args.max_num_seqs, args.expert_slots, args.context, routing_trace=args.routing_trace)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    plan, roof, bw = report["plan"], report["roofline"], report["bandwidth"]
    rows = [(f"weights: {name}", n) for name, n in plan["weights"].items() if n]
    rows += [(f"host: {name}", n) for name, n in plan["host_weights"].items()]
    rows += [(f"KV cache ({report['max_num_seqs']} x {report['max_model_len']} tokens)", plan["kv_cache"]),
             ("reserve (CUDA context, workspace, graphs, activations)", plan["reserve"]),
             (f"expert slots ({plan['num_slots']} x {plan['slot_bytes']} bytes)", plan["experts_on_device"]),
             ("total on the GPU", plan["gpu_total"]), ("GPU budget", plan["gpu_budget"])]
    if not plan["resident"]:
        rows.append(("host expert store", plan["host_store"]))
    print(f"{report['model']} ({report['architecture']}, {report['dtype']})")
    for name, n in rows:
        print(f"  {name:<48} {gib(n):>12}")
    state = "resident" if plan["resident"] else "offloaded"
    print(f"  experts: {state}, {plan['num_slots']} of {plan['num_experts']} cached "
          f"({100 * plan['cached_fraction']:.1f}%), top_k {plan['top_k']}")
    print(f"  batch-1 decode roofline, bandwidths {bw['source']}:")
    print(f"    resident bound  {roof['resident_tok_s']:>10} tok/s ({roof['device_bytes_per_token'] / 1e9:.3f} GB/token "
          f"at {bw['device_gbps']:g} GB/s)")
    if not plan["resident"]:
        print(f"    copy bound      {roof['copy_bound_tok_s']:>10} tok/s ({roof['miss_bytes_per_token'] / 1e9:.3f} GB "
              f"missed/token at {bw['h2d_pinned_gbps']:g} GB/s, {_routing_label(report['routing'])})")
        print(f"    offloaded bound {roof['offloaded_tok_s']:>10} tok/s")


def _routing_label(routing: dict) -> str:
    if routing["source"] == "uniform":
        return "uniform routing"
    return f"{routing['policy']} eviction on {routing['source']}: hit rate {routing['hit_rate']:.3f}"


def _eval_ppl(args) -> None:
    import hashlib
    import json
    from pathlib import Path

    from moetier.eval.perplexity import sliding_window_perplexity
    from moetier.llm import LLM

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise MoetierError(f"--text {args.text} is not a file")
        text, source = path.read_text(encoding="utf-8", errors="strict"), str(path)
    else:
        from moetier.eval.corpus import build_corpus_text

        text, source = build_corpus_text("heldout"), "held-out split of the stdlib corpus recipe"
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"text: {source}, sha256 {text_sha256}", file=sys.stderr)
    llm = LLM(args.model, **_engine_options(args))
    ids = llm.engine.require_tokenizer().encode(text, add_special_tokens=False)[: args.limit_tokens]
    window = args.window or llm.engine.resolved.max_model_len - 1
    stride = args.stride or max(window // 2, 1)
    if not 0 < stride <= window < llm.engine.resolved.max_model_len:
        raise MoetierError("need 0 < stride <= window < max-model-len")
    result = sliding_window_perplexity(llm.score, ids, window, stride)
    print(json.dumps({
        "model": str(llm.engine.source.model_dir), "text": source, "text_sha256": text_sha256,
        "tokens_scored": result.tokens_scored, "mean_nll": round(result.mean_nll, 5),
        "perplexity": round(result.perplexity, 4), "window": window, "stride": stride,
        "dtype": str(llm.engine.resolved.dtype).removeprefix("torch."),
    }))


def _trace(args) -> None:
    {"record": _trace_record, "analyze": _trace_analyze, "simulate": _trace_simulate,
     "synth": _trace_synth}[args.trace_command](args)


def _trace_record(args) -> None:
    from pathlib import Path

    from moetier.llm import LLM
    from moetier.trace.record import record, text_windows

    llm = LLM(args.model, **_engine_options(args))
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise MoetierError(f"--prompts {args.prompts} is not a file")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        if args.text:
            path = Path(args.text)
            if not path.is_file():
                raise MoetierError(f"--text {args.text} is not a file")
            text = path.read_text(encoding="utf-8")
        else:
            from moetier.eval.corpus import build_corpus_text

            text = build_corpus_text("heldout")
        if args.max_tokens < 1:
            raise MoetierError("--max-tokens must be >= 1")
        window = args.window or min(512, llm.engine.resolved.max_model_len) - args.generate - 1
        if not 0 < window or window + args.generate >= llm.engine.resolved.max_model_len:
            raise MoetierError("need 0 < window and window + --generate < max-model-len")
        ids = llm.engine.require_tokenizer().encode(text, add_special_tokens=False)
        prompts = text_windows(ids, window, args.max_tokens)
    trace = record(llm, prompts, args.generate)
    trace.save(args.out)
    print(f"{trace.num_tokens} tokens ({int(trace.phase.sum())} decode) in {len(prompts)} sequences -> {args.out}",
          file=sys.stderr)


def _trace_analyze(args) -> None:
    from moetier.trace.analyze import write_report
    from moetier.trace.format import load_trace

    for path in write_report(load_trace(args.trace), args.out):
        print(path)


def _trace_simulate(args) -> None:
    import json

    from moetier.offload.cache import POLICY_NAMES
    from moetier.trace.format import load_trace
    from moetier.trace.simulate import results_markdown, select_phase, simulate_grid

    try:
        fractions = [float(v) for v in args.cache_fraction.split(",") if v]
    except ValueError:
        raise MoetierError(f"--cache-fraction: expected comma-separated numbers, got {args.cache_fraction!r}") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise MoetierError("--cache-fraction values must lie in (0, 1]")
    policies = [p for p in args.policy.split(",") if p]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise MoetierError(f"unknown policy {', '.join(unknown)} (known: {', '.join(POLICY_NAMES)})")
    trace = select_phase(load_trace(args.trace), args.phase)
    if trace.num_tokens == 0:
        raise MoetierError(f"the trace has no {args.phase} tokens")
    results = simulate_grid(trace, policies, fractions)
    if args.json:
        print(json.dumps([dict(vars(r), hit_rate=r.hit_rate) for r in results], indent=1))
    else:
        print(results_markdown(trace, results), end="")


def _trace_synth(args) -> None:
    import json

    from moetier.trace.format import load_trace
    from moetier.trace.synthetic import FITTABLE, fit, generate, generate_like

    flags = {"sigma": args.sigma, "concentration": args.concentration, "hot_experts": args.hot_experts,
             "hot_prob": args.hot_prob, "period": args.period}
    allowed = {"uniform": (), "lognormal": ("sigma",), "markov": ("sigma", "concentration"),
               "hotspot": ("hot_experts", "hot_prob", "period")}[args.kind]
    wrong = [k for k, v in flags.items() if v is not None and k not in allowed]
    if wrong:
        raise MoetierError(f"--kind {args.kind} takes no --{', --'.join(w.replace('_', '-') for w in wrong)}")
    params = {k: v for k, v in flags.items() if v is not None}
    if args.fit:
        donor = load_trace(args.fit)
        if args.kind in FITTABLE:
            params = {**fit(args.kind, donor, seed=args.seed), **params}
        layers = args.layers or len(donor.moe_layers)
        experts, top_k = args.experts or donor.num_experts, args.top_k or donor.top_k
        tokens = args.tokens if args.tokens is not None else donor.num_tokens
        if (layers, experts, top_k) == (len(donor.moe_layers), donor.num_experts, donor.top_k):
            trace = generate_like(args.kind, donor, tokens, seed=args.seed, seq_len=args.seq_len, **params)
        else:
            trace = generate(args.kind, layers, experts, top_k, tokens, seed=args.seed, seq_len=args.seq_len,
                             **params)
    else:
        if not (args.layers and args.experts and args.top_k):
            raise MoetierError("trace synth: give --layers, --experts and --top-k, or --fit a donor trace")
        trace = generate(args.kind, args.layers, args.experts, args.top_k,
                         4096 if args.tokens is None else args.tokens, seed=args.seed, seq_len=args.seq_len,
                         **params)
    trace.save(args.out)
    print(f"{trace.num_tokens} tokens, {len(trace.moe_layers)} layers x {trace.num_experts} experts top-{trace.top_k}, "
          f"{args.kind} {json.dumps(params, sort_keys=True)} -> {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"generate": _generate, "chat": _chat, "serve": _serve, "eval-ppl": _eval_ppl, "bench": _bench,
         "calibrate": _calibrate, "fit": _fit, "trace": _trace}[args.command](args)
    except MoetierError as e:
        print(f"moetier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
