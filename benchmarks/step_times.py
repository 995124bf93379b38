"""Step by step: the wall time of each offloaded decode step, the host's wait for the routing in it, and the
Python cycle collector's runs, to tell a process slow at every step from one slowed by a few long steps.
One JSON line: step-time mean, deciles 1/3/5/7/9 and max, the mean host time outside the routing waits, the
steps over 70 ms (index, ms, routing-wait ms), and the collector's runs (full collections one by one). With
--phases, also each phase's milliseconds in the slow steps and in the median one, and its longest call there
(the engine's scheduling, input loading, expert calls and their stages, sampling, output): where a slow step's
extra time goes. Every step also records what the kernel counts for the main thread (its CPU time, minor faults,
context switches, the core it ends on), the CPU time of all its threads, and the machine's steal and NUMA
hint-fault counters, and when it started (to line up with a probe on another core): a step slower on the
host throughout is descheduled (CPU time short of wall time, steal), faulting (NUMA balancing unmapping pages),
migrated, or running a slower core.

    python benchmarks/step_times.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
        --routing synthetic:uniform [--steps 128] [--phases] [--pin-core N]
        [--label NAME]

One sequence of a 512-token prompt, 10 decode steps of warm-up, then --steps timed ones (batch 1).
"""

import argparse
import gc
import json
import os
import resource
import statistics
import time
from collections import defaultdict

import torch
from host_time_offload import time_calls
from offload_probe import add_arguments, load

from moetier import SamplingParams

PROMPT, WARM_STEPS = 512, 10
MAX_MODEL_LEN = 700  # as measured (the KV cache, and so the slot count, follows it)
SLOW_MS = 70.0


class CollectorLog:
    """(step, generation, ms) of every cycle collection while attached."""

    def __init__(self):
        self.runs: list[tuple[int, int, float]] = []
        self.step = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.runs.append((self.step, info["generation"], round((time.perf_counter() - self._started) * 1e3, 2)))


class PhaseClock:
    """Each step's milliseconds per wrapped method (host_time_offload.time_calls), and its longest call."""

    def __init__(self):
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.longest: dict[str, float] = {}

    def wrap(self, owner, name: str, prefix: str) -> None:
        time_calls(owner, name, self.seconds, prefix, self.longest)

    def take(self) -> dict:
        """This step's figures (ms, longest call ms), and a fresh start for the next."""
        taken = {key: [round(s * 1e3, 2), round(self.longest[key] * 1e3, 2)] for key, s in self.seconds.items()}
        self.seconds.clear()
        self.longest.clear()
        return taken


def os_counters() -> dict:
    """The main thread's CPU ms, minor faults, voluntary and forced context switches and core; the machine's steal
    jiffies and NUMA hint faults."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    with open("/proc/thread-self/stat") as stat:
        core = int(stat.read().rsplit(")", 1)[1].split()[36])  # field 39, "processor"
    with open("/proc/stat") as stat:
        steal = int(stat.readline().split()[8])
    return {"cpu_ms": time.thread_time() * 1e3, "process_cpu_ms": time.process_time() * 1e3, "minflt": usage.ru_minflt, "nvcsw": usage.ru_nvcsw,
            "nivcsw": usage.ru_nivcsw, "core": core, "steal": steal, "numa_hint_faults": _vmstat("numa_hint_faults")}


def _vmstat(key: str) -> int:
    with open("/proc/vmstat") as vmstat:
        return next((int(line.split()[1]) for line in vmstat if line.startswith(key + " ")), -1)


def counter_deltas(before: dict, after: dict) -> dict:
    deltas = {key: after[key] - before[key] for key in before if key != "core"}
    deltas["cpu_ms"] = round(deltas["cpu_ms"], 1)
    deltas["process_cpu_ms"] = round(deltas["process_cpu_ms"], 1)
    deltas["core"] = after["core"] if after["core"] == before["core"] else f"{before['core']}->{after['core']}"
    return deltas


def machine_facts() -> dict:
    """Kernel settings that could stall a host thread now and then."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    return {"numa_balancing": read("/proc/sys/kernel/numa_balancing"),
            "numa_nodes": len([n for n in os.listdir("/sys/devices/system/node") if n.startswith("node")])
            if os.path.isdir("/sys/devices/system/node") else None,
            "thp": read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
            "siblings_cpu0": read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")}


def phase_clock(engine) -> PhaseClock:
    """The engine's step phases and the offloaded executor's stages, wrapped (keys: owner.method)."""
    clock = PhaseClock()
    executor = engine.executor
    owners = {"scheduler": (engine.scheduler, ("schedule",)), "runner": (engine.runner, ("run",)),
              "sampler": (engine.sampler, ("sample",)), "engine": (engine, ("_append",)),
              "graphs": (engine.runner.graphs, ("_load_inputs", "_replay")),
              "executor": (executor, ("run", "_read_routing", "_plan_and_copy", "_replay_step",
                                      "_fold_in_timings", "_copy_claimed", "_mark_read", "_prefetch_next",
                                      "command_first_copy")),
              "planner": (executor.planner, ("access", "end_step"))}
    for label, (owner, names) in owners.items():
        for name in names:
            if owner is not None and hasattr(owner, name):
                clock.wrap(owner, name, f"{label}.")
    return clock


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--phases", action="store_true", help="time the step's phases (adds ~1 us a wrapped call)")
    parser.add_argument("--pin-core", type=int, help="run the main thread on this one core only")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.pin_core is not None:
        os.sched_setaffinity(0, {args.pin_core})  # 0: this thread; the driver's threads keep every core
    llm = load(args, max(MAX_MODEL_LEN, PROMPT + WARM_STEPS + args.steps + 8))
    engine, executor = llm.engine, llm.engine.executor
    engine.add_request(torch.randint(0, engine.source.spec.vocab_size, (PROMPT,)).tolist(),
                       SamplingParams(max_tokens=WARM_STEPS + args.steps + 4, ignore_eos=True))
    for _ in range(WARM_STEPS):
        engine.step()
    torch.cuda.synchronize()
    clock = phase_clock(engine) if args.phases else None
    log = CollectorLog()
    gc.callbacks.append(log)
    steps_ms, waits_ms, phases, counters, starts = [], [], [], [], []
    hint_faults_before = _vmstat("numa_hint_faults")
    for i in range(args.steps):
        log.step = i
        before = os_counters()
        starts.append(time.time())
        waited, started = executor.routing_sync_s, time.perf_counter()
        engine.step()
        steps_ms.append((time.perf_counter() - started) * 1e3)
        waits_ms.append((executor.routing_sync_s - waited) * 1e3)
        counters.append(counter_deltas(before, os_counters()))
        if clock is not None:
            phases.append(clock.take())
    gc.callbacks.remove(log)
    median_step = sorted(range(args.steps), key=steps_ms.__getitem__)[args.steps // 2]
    slow = [i for i, ms in enumerate(steps_ms) if ms > SLOW_MS]
    print(json.dumps({
        "label": args.label, "cpus": len(os.sched_getaffinity(0)),
        "pin_core": args.pin_core, "machine": machine_facts(),
        "numa_hint_faults_run": _vmstat("numa_hint_faults") - hint_faults_before,
        "step_ms_mean": round(statistics.mean(steps_ms), 2),
        "step_ms_deciles_1_3_5_7_9": [round(x, 2) for x in statistics.quantiles(steps_ms, n=10)[::2]],
        "step_ms_max": round(max(steps_ms), 2),
        "host_outside_routing_wait_ms_mean": round(statistics.mean(s - w for s, w in zip(steps_ms, waits_ms)), 2),
        "routing_wait_ms_mean": round(statistics.mean(waits_ms), 2),
        "expert_copy_us": round(executor.window.copy_s * 1e6, 1) if executor.window.copy_s else None,
        "slow_steps": [(i, round(s, 1), round(w, 1)) for i, (s, w) in enumerate(zip(steps_ms, waits_ms)) if s > SLOW_MS],
        "gc_full_collections": [run for run in log.runs if run[1] == 2],
        "gc_young_ms": round(sum(ms for _, generation, ms in log.runs if generation < 2), 1),
        "gc_runs": len(log.runs),
        "os_median_step": counters[median_step], "os_slow_steps": {i: counters[i] for i in slow},
        "os_totals": {key: round(sum(c[key] for c in counters), 1) for key in counters[0] if key != "core"},
        "core_changes": sum(isinstance(c["core"], str) for c in counters),
        "step_start_unix": [round(t, 4) for t in starts], "steps_ms": [round(ms, 2) for ms in steps_ms],
        **({"phases_median_step": phases[median_step],
            "phases_slow_steps": {i: phases[i] for i in slow}} if phases else {})}))


if __name__ == "__main__":
    main()
