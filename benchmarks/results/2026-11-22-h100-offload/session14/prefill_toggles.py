"""Ad-hoc (session 14): OLMoE-1B-7B 4 GiB prefill of 512 tokens with this session's copy-engine changes toggled
in one process: per-slot copy events (off: a new event per copy, as before), and skipping queries of reader
events known complete (off: reads_complete does nothing). Prints ms per prefill per config per round."""
import json, sys, time
sys.path.insert(0, "benchmarks")
import argparse
import torch
from offload_probe import add_arguments, load, prefill_call
from moetier.offload.copy_engine import CudaCopyEngine

parser = argparse.ArgumentParser(); add_arguments(parser)
parser.add_argument("--rounds", type=int, default=4); parser.add_argument("--prefills", type=int, default=3)
args = parser.parse_args()
llm = load(args, 1024)
engine = llm.engine.executor.copy_engine
copied, reads_complete = CudaCopyEngine._copied, CudaCopyEngine.reads_complete

def new_event_copied(self, dst, timed):
    done = torch.cuda.Event(enable_timing=timed)
    done.record(self.stream)
    return done

def configure(slot_events: bool, skip_queries: bool) -> None:
    engine._copied = (lambda dst, timed: copied(engine, dst, timed)) if slot_events else (lambda dst, timed: new_event_copied(engine, dst, timed))
    engine.reads_complete = (lambda: reads_complete(engine)) if skip_queries else (lambda: None)

prefill = prefill_call(llm, 512)
configs = {"both": (True, True), "new_events": (False, True), "query_all": (True, False), "neither": (False, False)}
for name, c in configs.items():
    configure(*c); prefill()
for r in range(args.rounds):
    for name, c in configs.items():
        configure(*c)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(args.prefills):
            prefill()
        torch.cuda.synchronize()
        print(json.dumps({"round": r, "config": name, "ms": round((time.perf_counter() - t) / args.prefills * 1e3, 2)}), flush=True)
