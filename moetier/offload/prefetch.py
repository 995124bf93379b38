"""PrefetchWindow: how many predicted experts to copy ahead of the next MoE layer.

Between the end of a layer's own copies and the next layer's routing on the GPU (its experts'
compute, the next attention and router) the copy engine would idle. Copies of guessed experts
started behind this layer's own fill that window; beyond it they only delay the next layer's own
copies, by a whole copy for each wrong guess, and save nothing more for each right one (the bytes
would have been copied anyway). So the depth is the window over the time one expert copy takes,
both measured with timing events on the copy engine (running averages), independent of whether
prefetching is on: the window ends at the next layer's routing, not at a copy.
"""

from moetier.offload.copy_engine import CopyEngine, Event

MEMORY = 0.9  # the running averages' weight on their past


class PrefetchWindow:
    def __init__(self, copy_engine: CopyEngine):
        self.copy_engine = copy_engine
        self.copy_s: float | None = None  # one expert copy
        self.window_s: float | None = None
        self._copies: tuple[Event, Event, int] | None = None  # the last layer's own copies: start, end, count
        self._routing: Event | None = None

    def copies_start(self) -> Event:
        return self.copy_engine.marker(on_copies=True)

    def copies_issued(self, start: Event, count: int) -> None:
        """The layer's own copies (possibly none) are issued; its window opens when they end."""
        self._copies = (start, self.copy_engine.marker(on_copies=True), count)

    def routing_issued(self) -> None:
        """Called when the next layer's routing is enqueued, before the host reads it."""
        self._routing = self.copy_engine.marker(on_copies=False)

    def measure(self) -> None:
        """After the routing read (the host has synced with compute): folds in the last layer's copy
        time per expert and its window. Call only when that layer is the one before this routing's."""
        if self._copies is None or self._routing is None:
            return
        (start, end, count), routing = self._copies, self._routing
        self._copies = self._routing = None
        if not end.query():  # the copy engine was still busy at the routing: no window
            self.window_s = _average(self.window_s, 0.0)
            return
        if count:
            self.copy_s = _average(self.copy_s, self.copy_engine.elapsed(start, end) / count)
        self.window_s = _average(self.window_s, max(0.0, self.copy_engine.elapsed(end, routing)))

    def discard(self) -> None:
        """The layer ran in rounds (its copies waited for compute): its timings say nothing."""
        self._copies = None

    def depth(self) -> int:
        """Guessed experts whose copies fit in the window (0 until both are measured)."""
        if not self.copy_s or self.window_s is None:
            return 0
        return int(self.window_s / self.copy_s)


def _average(average: float | None, value: float) -> float:
    return value if average is None else MEMORY * average + (1 - MEMORY) * value
