"""Server metrics in the Prometheus text format (version 0.0.4), with no client library.

Counters, gauges and histograms are plain Python objects guarded by one lock, so the engine
thread and the event loop can both update them. `ServerMetrics.render()` writes the exposition
text for `/metrics`; engine-side gauges (running sequences, queue depth, offload statistics) come
from a snapshot the engine thread publishes, so a scrape never touches torch.
"""

import bisect
import math
import threading
import time
from collections import deque

# Latency buckets in seconds: fine at the low end (decode steps are milliseconds), long tail for queueing.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
THROUGHPUT_WINDOW_S = 10.0


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        key = tuple(str(v) for v in label_values)
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.label_names, k)} {_format_value(v)}" for k, v in sorted(self.values.items())]
        return out


class Gauge:
    def __init__(self, name: str, help_text: str):
        self.name, self.help, self.value = name, help_text, 0.0

    def lines(self) -> list[str]:
        value = _format_value(self.value)
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {value}"]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last: above every bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (math.inf,), self.counts):
            cumulative += count
            out.append(f'{self.name}_bucket{{le="{_format_value(bound)}"}} {cumulative}')
        out += [f"{self.name}_sum {_format_value(self.sum)}", f"{self.name}_count {cumulative}"]
        return out


class ServerMetrics:
    """Everything `/metrics` reports. Methods are safe to call from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter("moetier_requests_total", "HTTP requests to /v1 endpoints by status code",
                                ("endpoint", "status"))
        self.finished = Counter("moetier_sequences_finished_total", "generated sequences by finish reason",
                                ("reason",))
        self.prompt_tokens = Counter("moetier_prompt_tokens_total", "prompt tokens of admitted sequences")
        self.generation_tokens = Counter("moetier_generation_tokens_total", "tokens generated")
        self.ttft = Histogram("moetier_time_to_first_token_seconds", "request arrival to first token", TTFT_BUCKETS)
        self.tpot = Histogram("moetier_time_per_output_token_seconds", "time between consecutive output tokens",
                              TPOT_BUCKETS)
        self._recent_tokens: deque[tuple[float, int]] = deque()  # (time, tokens) per engine step
        self._engine_gauges: dict[str, float] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests.inc(1, endpoint, str(status))

    def count_prompt(self, num_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens.inc(num_tokens)

    def count_step(self, num_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.generation_tokens.inc(num_tokens)
            self._recent_tokens.append((now, num_tokens))
            while self._recent_tokens and self._recent_tokens[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent_tokens.popleft()

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished.inc(1, reason)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    def set_engine_gauges(self, gauges: dict[str, float]) -> None:
        """Called by the engine thread with a fresh snapshot (running, waiting, offload statistics)."""
        with self._lock:
            self._engine_gauges = dict(gauges)

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [n for t, n in self._recent_tokens if t >= now - THROUGHPUT_WINDOW_S]
        return sum(recent) / THROUGHPUT_WINDOW_S

    def render(self, queue_depth: int, running: int, engine_alive: bool) -> str:
        throughput = Gauge("moetier_generation_tokens_per_second",
                           f"tokens generated per second, averaged over the last {THROUGHPUT_WINDOW_S:g} s")
        throughput.value = self.tokens_per_second()
        gauges = [throughput]
        for name, help_text, value in (
            ("moetier_queue_depth", "sequences accepted but not yet running", queue_depth),
            ("moetier_running_sequences", "sequences in the running batch", running),
            ("moetier_engine_alive", "1 while the engine thread runs", int(engine_alive)),
        ):
            gauge = Gauge(name, help_text)
            gauge.value = value
            gauges.append(gauge)
        with self._lock:
            for key, value in sorted(self._engine_gauges.items()):
                gauge = Gauge(f"moetier_{key}", key.replace("_", " "))
                gauge.value = value
                gauges.append(gauge)
            families = [self.requests, self.finished, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot]
            lines = [line for family in families + gauges for line in family.lines()]
        return "\n".join(lines) + "\n"
