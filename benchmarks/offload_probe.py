"""What the offloading probes (host_time_offload.py, offload_ab.py, gpu_tail_probe.py, ...) share: their
model, budget, routing and batch arguments, the dummy-weight LLM with that routing in place, and the
prefill their --prefill option times."""

import argparse
from collections.abc import Callable

import torch

from moetier import LLM, SamplingParams
from moetier.trace.replay import replay_routing, routing_trace_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("--gpu-memory", required=True)
    parser.add_argument("--routing", default="router", help="router, replay:FILE or synthetic:KIND")
    parser.add_argument("--batch", type=int, default=1)


def load(args: argparse.Namespace, max_model_len: int = 1024) -> LLM:
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=8,
              max_num_batched_tokens=2048, gpu_memory=args.gpu_memory)
    if args.routing != "router":
        replay_routing(llm.engine, routing_trace_for(llm.engine, args.routing))
    return llm


def prefill_call(llm: LLM, tokens: int) -> Callable[[], None]:
    """A call that prefills one random `tokens`-token prompt, the same each time (as `moetier bench`
    repeats its prompt), and samples one token."""
    prompt = torch.randint(0, llm.engine.source.spec.vocab_size, (1, tokens)).tolist()
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    return lambda: llm.generate(prompt, params)
