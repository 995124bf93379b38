"""The host CPU's pace over time, from another core: a fixed piece of pure-Python work repeated for --seconds,
its mean time per 20 ms window with the window's wall-clock start. Run beside step_times.py (pinned to a core
the engine's main thread is not on) to tell whether its slow steps are the whole machine's (this probe slows at
the same moments) or one core's.

    taskset -c 8 python benchmarks/cpu_pace.py --seconds 120 > pace.json

One JSON object: the unit of work's median time, and [start unix s, mean us] per window.
"""

import argparse
import json
import statistics
import time

WINDOW_S = 0.02


def unit_of_work() -> int:
    return sum(i * i for i in range(2000))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    windows, end = [], time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        start_unix, start, reps = time.time(), time.perf_counter(), 0
        while time.perf_counter() - start < WINDOW_S:
            unit_of_work()
            reps += 1
        windows.append((round(start_unix, 4), round((time.perf_counter() - start) / reps * 1e6, 1)))
    print(json.dumps({"median_us": statistics.median(us for _, us in windows), "windows": windows}))


if __name__ == "__main__":
    main()
