"""`moetier calibrate`: the concurrent-rate window on CPU with timed workloads; the GPU measurements
on the device machine."""

import threading
import time

import pytest

from moetier.offload.calibrate import combined_host_gbps, concurrent_rates, gpu_expert_profile


def sleeping(seconds: float, count: int, calls: list | None = None):
    """A workload whose unit sleeps `seconds` and counts `count`: its rate is count / seconds at most."""
    def unit() -> int:
        if calls is not None:
            calls.append(threading.current_thread().name)
        time.sleep(seconds)
        return count
    return unit


def test_rates_of_two_workloads_run_together():
    fast_calls, slow_calls = [], []
    fast, slow = concurrent_rates([sleeping(0.01, 10, fast_calls), sleeping(0.05, 50, slow_calls)], 0.3)
    for rate in (fast, slow):  # 1000 per second at most; sleeps only overshoot
        assert 600 < rate <= 1000
    assert len(set(fast_calls)) == 1 and len(set(slow_calls)) == 1 and set(fast_calls) != set(slow_calls)


def test_window_lasts_until_every_workload_finished_a_unit():
    fast_calls = []
    fast, slow = concurrent_rates([sleeping(0.01, 10, fast_calls), sleeping(0.4, 400)], 0.05)
    assert len(fast_calls) >= 30  # the fast one kept going while the slow one finished its first unit
    assert 600 < fast <= 1000 and 600 < slow <= 1000


def test_unit_running_when_the_window_closes_is_not_counted():
    # The slow workload's units end near 0.1, 0.2 and 0.3 s; the window closes when the fast one
    # stops, at about 0.25 s, so the huge count of the third unit must not reach its rate.
    counts = iter([100, 100, 10**9, 10**9])

    def slow_unit() -> int:
        time.sleep(0.1)
        return next(counts)

    _, slow = concurrent_rates([sleeping(0.02, 20), slow_unit], 0.25)
    assert 600 < slow <= 1000


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_workload_stops_the_others_and_raises(failing):
    def broken() -> int:
        raise ValueError("broken unit")

    workloads = [sleeping(0.01, 1), sleeping(0.01, 1)]
    workloads[failing] = broken
    start = time.perf_counter()
    with pytest.raises(ValueError, match="broken unit"):
        concurrent_rates(workloads, 5.0)
    assert time.perf_counter() - start < 2.0


@pytest.mark.gpu
def test_gpu_expert_profile_small_shape():
    profile = gpu_expert_profile(shapes=[(512, 256)])
    us = profile["gpu_expert_us"]["D512_F256"]
    assert list(us) == ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512"]
    assert all(0 < t < 1e4 for t in us.values())
    assert 0 < profile["gpu_expert_t1_weight_gbps"]["D512_F256"] < 1e4


@pytest.mark.gpu
def test_combined_host_bandwidths_are_positive():
    copy, read = combined_host_gbps(copy_bytes=64 << 20, read_bytes=256 << 20, seconds=0.3)
    assert copy > 0 and read > 0
