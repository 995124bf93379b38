"""PrefetchWindow: how many predicted experts to copy ahead of the next MoE layer.

Between the end of a layer's own copies and the first copy the next layer issues (its experts'
compute, the next attention and router, the routing read and the host's planning) the copy engine
would idle: that is the window. Copies of guessed experts started behind a layer's own run in it.
With n guesses of precision p, one copy taking c and a window W, the next layer finishes
W - max(W, n c) + n p c sooner: every guess that fits the window saves p c; past it each costs
c (1 - p) (a wrong guess delays the next layer's own copies; a right one would have been copied
anyway). So the depth is the guesses that fit, plus one more when the window's remainder exceeds
c (1 - p). W and c are measured with timing events (running averages), whether or not
prefetching is on: the window ends at the compute stream's clock when the next layer starts its
copies, which prefetched copies do not move. One layer step in SAMPLE_EVERY is timed, with the window
after it: timing every layer step cost ~20 us of host work between a batch-1 step's routing read and the
next layer's launch (window_ends 10.7, copies_issued 7.9: benchmarks/host_time_offload.py, results README
session 12). The executor times its copy stalls on the same layer steps.
"""

from moetier.offload.copy_engine import CopyEngine, Event

MEMORY = 0.9  # the running averages' weight on their past
# A decode step of a 48-layer model still times ~10; no supported model's MoE layer count is a multiple of
# it, so the timed layer steps go round every layer.
SAMPLE_EVERY = 5


class PrefetchWindow:
    def __init__(self, copy_engine: CopyEngine, sample_every: int = SAMPLE_EVERY):
        self.copy_engine = copy_engine
        self.sample_every = sample_every
        self._steps = 0
        self._timing = False  # this layer step is timed
        self.copy_s: float | None = None  # one expert copy
        self.window_s: float | None = None
        self._start: Event | None = None  # this layer's copies start (copy stream)
        self._end: Event | None = None  # the last layer's copies end (copy stream)
        self._pending: list[tuple[str, Event, Event, int]] = []  # measurements whose events may not have completed

    def times_step(self) -> bool:
        """Called at each layer step's routing read: whether it is timed (its first copy then a timing one)."""
        self._timing = self._steps % self.sample_every == 0
        self._steps += 1
        return self._timing

    def copies_start(self, first_copy: Event | None) -> None:
        """Called after a timed layer step's routing read, once the copies into spare slots are issued: the span
        the layer's other copies are timed over starts at the end of the first of them (`first_copy`), else
        at a marker before any. (A marker before the first copy would cost it ~10-30 us of host time.)"""
        if self._timing:
            self._start = first_copy or self.copy_engine.marker(on_copies=True)

    def window_ends(self, first_layer: bool) -> None:
        """Called once the layer's first copies are issued (the compute stream idle, so the marker
        completes at once): closes the window of the layer before, which thus holds those copies' few
        microseconds of issue (not across steps: the first MoE layer's window would hold the lm_head
        and sampling). After the first copies, not before: the compute stream's marker costs ~10 us of
        host time (looking up the current stream), and the first copy waits for whatever comes first."""
        if self._end is None:  # the layer before was not timed
            return
        if not first_layer:
            now = self.copy_engine.marker(on_copies=False)  # compute is idle here: completes at once
            self._pending.append(("window", self._end, now, 0))
        self._end = None

    def copies_issued(self, count: int) -> None:
        """The layer's own copies are issued (`count` of them timed from copies_start's start, possibly
        none); its window opens when they end. (Timed layer steps only.)"""
        if not self._timing:
            return
        self._end = self.copy_engine.marker(on_copies=True)
        if count and self._start is not None:
            self._pending.append(("copy", self._start, self._end, count))
        self._start = None

    def discard(self) -> None:
        """The layer runs in rounds (its later copies wait for compute): its timings say nothing."""
        self._start = self._end = None
        self._pending = [m for m in self._pending if m[0] == "window"]

    def measure(self) -> None:
        """Folds in the measurements whose events have completed (the executor calls it before each routing
        read: the last layer's copies may still be running, and are folded in a layer later)."""
        waiting = []
        for kind, start, end, count in self._pending:
            if not (start.query() and end.query()):
                waiting.append((kind, start, end, count))
                continue
            seconds = max(0.0, self.copy_engine.elapsed(start, end))
            if kind == "copy":
                self.copy_s = running_average(self.copy_s, seconds / count)
            else:
                self.window_s = running_average(self.window_s, seconds)
        self._pending = waiting[-4:]  # a copy engine that never catches up does not grow this

    def depth(self, precision: float) -> int:
        """Guesses worth copying ahead at this precision (0 until both times are measured)."""
        if not self.copy_s or self.window_s is None:
            return 0
        fit = int(self.window_s / self.copy_s)
        return fit + (self.window_s - fit * self.copy_s > self.copy_s * (1 - precision))


def running_average(average: float | None, value: float) -> float:
    """MEMORY of the past and the rest of the new value (the value itself when there is no past)."""
    return value if average is None else MEMORY * average + (1 - MEMORY) * value
