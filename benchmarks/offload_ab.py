"""Offloaded decode (or prefill) with one executor feature on and off, in one process (no run-order or
machine effect), in alternating rounds of timed decode steps (or prefills). One JSON line per round.

    --toggle captured: the piecewise graphs' expert-compute graphs and their in-graph predictor guesses
        (cuda_graphs.PiecewiseDecodeGraphs); off, the executor computes and predicts eagerly.
    --toggle spare: the planner's spare slots (planner.py: the first misses copy right after the routing
        read); off, no slot is kept free, and every miss waits for the step's planning.
    --toggle memcpy: expert copies through the runtime's cudaMemcpyAsync (copy_engine.py); off, through
        torch's copy_ on the copy stream made current.
    --toggle ahead: a layer step's rounds after the first planned and copying while the round before waits
        for its copies (planner.next_round); off, each planned after the round before computed, as large as
        fits (the executor before 2026-11-22).
    --toggle round-guess: the predictor's guesses for the next layer copied behind a step that ran in rounds;
        off, only behind steps that fit in one pass (the executor before e484dd9).
    --toggle split: a captured GEMV-sized step with at least executor.SPLIT_MIN_LOADS loads computes its
        other experts while its last copy streams in, then that one's; off, all of them after the last copy.
    --toggle mailbox: a graphed step's routing (and guess) polled from the pinned memory its graph writes
        (kernels/routing_mailbox.py); off, copied to the host after the graph and read after a stream sync.
    --toggle first-copy: in a graphed step each layer's first miss copied by a kernel right after its routing
        (kernels/first_copy.py); off, the kernel runs but copies nothing, and the copy engine copies every miss.
    --toggle recorder: the routing recorder `moetier bench` attaches (its copies in the graphs, its per-step work).

    python benchmarks/offload_ab.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB --toggle spare \
        [--routing synthetic:uniform] [--batch 1] [--rounds 3] [--steps 16] [--max-model-len 577] [--prefill 512]

--prefill N: each timed step is a prefill of one N-token prompt (the same one, as `moetier bench` repeats it).

(`moetier bench --prompt-len 512 --output-len 64` sizes its KV cache for 577 tokens, and so the slot pool.)
"""

import argparse
import json
import time

import torch
from offload_probe import add_arguments, load, prefill_call

from moetier import SamplingParams
from moetier.bench import offload_figures
from moetier.engine.engine import Engine
from moetier.offload import executor as executor_module
from moetier.offload.calibrate import host_to_device_gbps
from moetier.trace.recorder import attach_recorder

PROMPT = 512


def captured_switch(engine: Engine):
    graphs = engine.runner.graphs
    captured = {size: [(call.compute, call.guess_TK) for call in calls] for size, calls in graphs.calls.items()}

    def switch(on: bool) -> None:
        for size, calls in graphs.calls.items():
            for call, (compute, guess_TK) in zip(calls, captured[size]):
                call.compute, call.guess_TK = (compute, guess_TK) if on else (None, None)
    return switch


def spare_switch(engine: Engine):
    planner = engine.executor.planner
    spare = planner.spare

    def switch(on: bool) -> None:
        planner.spare = spare if on else 0
    return switch


def memcpy_switch(engine: Engine):
    copy_engine = engine.executor.copy_engine
    memcpy = copy_engine.memcpy

    def switch(on: bool) -> None:
        copy_engine.memcpy = memcpy if on else None
    return switch


def ahead_switch(engine: Engine):
    planner = engine.executor.planner
    next_round = planner.next_round

    def serial(layer: int, experts: list[int], unread: list[int], width: int):
        return ([], iter(())) if unread else planner.start_round(layer, experts)

    def switch(on: bool) -> None:
        planner.next_round = next_round if on else serial
    return switch


def round_guess_switch(engine: Engine):
    executor = engine.executor
    prefetch_guess = executor._prefetch_guess

    def in_one_pass(layer, guessed, window):
        if window:
            prefetch_guess(layer, guessed, window)

    def switch(on: bool) -> None:
        executor._prefetch_guess = prefetch_guess if on else in_one_pass
    return switch


def split_switch(engine: Engine):
    split_min_loads = executor_module.SPLIT_MIN_LOADS

    def switch(on: bool) -> None:
        executor_module.SPLIT_MIN_LOADS = split_min_loads if on else engine.executor.spec.num_experts + 1
    return switch


def mailbox_switch(engine: Engine):
    graphs = engine.runner.graphs
    published = {size: [call.published for call in calls] for size, calls in graphs.calls.items()}

    def switch(on: bool) -> None:
        for size, calls in graphs.calls.items():
            for call, box in zip(calls, published[size]):
                call.published = box if on else None
    return switch


def recorder_switch(engine: Engine):
    """`moetier bench` records the routing of every step (for its replayed hit rates): the recorder's copies
    captured into the decode graphs and its per-step work, on against off. Each switch captures the graphs
    again."""
    recorder = attach_recorder(engine)

    def switch(on: bool) -> None:
        engine.runner.attach_recorder(recorder if on else None)
    return switch


def first_copy_switch(engine: Engine):
    executor = engine.executor

    def switch(on: bool) -> None:
        executor.gpu_first_copy = on
    return switch


SWITCHES = {"captured": captured_switch, "spare": spare_switch, "memcpy": memcpy_switch, "ahead": ahead_switch,
            "round-guess": round_guess_switch, "split": split_switch, "mailbox": mailbox_switch,
            "first-copy": first_copy_switch, "recorder": recorder_switch}


def alternate(args: argparse.Namespace, engine: Engine, switch, step, tokens: int, h2d_gbps: float,
              label: dict) -> None:
    """Rounds of the feature on, then off: per half, one untimed step (slots laid out anew after the
    switch), then --steps - 1 timed ones of `tokens` tokens each; one JSON line per half."""
    for round_ in range(args.rounds):
        for on in (True, False):
            switch(on)
            step()
            torch.cuda.synchronize()
            before, start = engine.offload_stats(), time.perf_counter()
            for _ in range(args.steps - 1):
                step()
            torch.cuda.synchronize()
            step_s = (time.perf_counter() - start) / (args.steps - 1)
            figures = offload_figures(before, engine.offload_stats(), args.steps - 1, step_s, tokens, h2d_gbps)
            print(json.dumps({"model": args.model, "routing": args.routing, **label, "round": round_,
                              args.toggle: on, "num_slots": engine.executor.pool.num_slots,
                              "tok_s": round(tokens / step_s, 2), **figures}), flush=True)


def prefill_ab(args: argparse.Namespace) -> None:
    """Alternating rounds of timed prefills of one --prefill-token prompt."""
    h2d_gbps = host_to_device_gbps(pinned=True)
    llm = load(args, args.max_model_len)
    switch = SWITCHES[args.toggle](llm.engine)
    prefill = prefill_call(llm, args.prefill)
    for on in (True, False):  # warm-up: kernels for this shape compiled either way
        switch(on)
        prefill()
    alternate(args, llm.engine, switch, prefill, args.prefill, h2d_gbps, {"prefill": args.prefill})


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--toggle", required=True, choices=sorted(SWITCHES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=0, help="time prefills of this many tokens, not decode")
    args = parser.parse_args()
    if args.prefill:
        prefill_ab(args)
        return
    warm = args.batch + 8  # the prefills and some decode steps
    tokens = warm + 2 * args.rounds * args.steps
    if PROMPT + tokens > args.max_model_len:
        raise SystemExit(f"{tokens} decode steps after a {PROMPT}-token prompt exceed --max-model-len {args.max_model_len}")
    h2d_gbps = host_to_device_gbps(pinned=True)
    engine = load(args, args.max_model_len).engine
    switch = SWITCHES[args.toggle](engine)
    for prompt in torch.randint(0, engine.source.spec.vocab_size, (args.batch, PROMPT)).tolist():
        engine.add_request(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    for _ in range(warm):
        engine.step()
    alternate(args, engine, switch, engine.step, args.batch, h2d_gbps, {"batch": args.batch})


if __name__ == "__main__":
    main()
