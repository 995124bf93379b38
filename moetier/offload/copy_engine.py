"""Copy engines: host -> device expert copies that run beside compute, ordered by events.

The interface is seven calls. `copy(dst, src, after, timed)` starts a copy once the reader event `after`
(the last kernel that read dst) has completed and returns an event that completes when dst's latest copy
has (a timing one only if `timed`: one after every copy slowed back-to-back 9.4 MB copies from 53.8 to
53.5 GB/s on the device H100, benchmarks/copy_events.py); `wait(events)` makes
compute wait for copies, and `stall_seconds()` says how long it stood still for them;
`synchronize(event)` blocks the host until a copy has completed (before its source is
overwritten); `mark_read(buffers)` returns an event recorded after the compute issued so far, which
the caller keeps as the last reader of those buffers; `marker(on_copies)` returns a timing event
that completes when the copies (or the compute) issued so far have, and `elapsed(a, b)` the
seconds between two completed markers.

CudaCopyEngine: a dedicated copy stream, non-blocking copies from pinned memory, runtime events, all through
the CUDA runtime's own calls (cuda_runtime.py); compute waits on the device (no host sync), only
`synchronize` blocks the host. DelayedCopyEngine: the CPU
stand-in for tests; it copies on a worker thread after an injected delay, so a missing wait reads
stale bytes and gives wrong numbers, and it records every copy into a buffer whose last reader was
not given as `after`.
"""

import queue
import threading
import time
from collections import deque
from typing import Protocol

import torch

from moetier.offload.cuda_runtime import CudaEvent, cuda_runtime, current_raw_stream


class Event(Protocol):
    def wait(self) -> None:
        """Blocks the host until the event has completed."""
        ...

    def query(self) -> bool:
        """Whether the event has completed (never blocks)."""
        ...


class CopyEngine(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool = False) -> Event: ...

    def wait(self, events: list[Event]) -> None:
        """Compute waits for these copies."""
        ...

    def stall_seconds(self) -> float:
        """Seconds compute has waited for copies since the last call (waits still in flight excluded)."""
        ...

    def synchronize(self, event: Event) -> None:
        """Blocks the host until the event has completed."""
        ...

    def mark_read(self, buffers: list[torch.Tensor]) -> Event: ...

    def marker(self, on_copies: bool) -> Event: ...

    def elapsed(self, start: Event, end: Event) -> float: ...


class CudaCopyEngine:
    def __init__(self, device: torch.device):
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self.runtime = cuda_runtime()
        self.stream = torch.cuda.Stream(device)
        self.stream_handle = self.stream.cuda_stream
        # each destination's one plain event, recorded again by every copy into it: what the executor keeps of
        # a copy is whether the slot's bytes have landed, and a slot takes new bytes only after its readers
        self._landed: dict[int, CudaEvent] = {}
        self._stalls: deque[tuple[CudaEvent, CudaEvent]] = deque()
        self._spare_pairs: list[tuple[CudaEvent, CudaEvent]] = []  # read stall pairs, recorded again
        self._waited: Event | None = None  # the reader event the stream last waited for

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool = False) -> Event:
        # A reader that completed needs no wait: after the routing read, every one recorded before it.
        if after is not None and after is not self._waited and not after.query():
            self.runtime.stream_wait(self.stream_handle, after.handle)
            self._waited = after  # the stream keeps its order: a later copy after the same reader need not wait
        # both contiguous bytes; the source pinned and kept by the store until the copy completed
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        destination = dst.data_ptr()
        self.runtime.copy_to_device(destination, src.data_ptr(), dst.nbytes, self.stream_handle)
        if timed:
            done = CudaEvent(self.runtime, timing=True)
        else:
            done = self._landed.get(destination)
            if done is None:
                done = self._landed[destination] = CudaEvent(self.runtime)
        done.record(self.stream_handle)
        return done

    def wait(self, events: list[Event]) -> None:
        """The compute stream waits on the device; a timing event on each side of the waits measures
        how long it stood still (it has nothing else queued between them)."""
        if not events:
            return
        stream = current_raw_stream(self.device_index)
        if self._spare_pairs:
            before, after = self._spare_pairs.pop()
        else:
            before, after = CudaEvent(self.runtime, timing=True), CudaEvent(self.runtime, timing=True)
        before.record(stream)
        for event in events:
            self.runtime.stream_wait(stream, event.handle)
        after.record(stream)
        self._stalls.append((before, after))

    def stall_seconds(self) -> float:
        seconds = 0.0
        while self._stalls and self._stalls[0][1].query():
            before, after = self._stalls.popleft()
            seconds += self.runtime.elapsed_seconds(before.handle, after.handle)
            self._spare_pairs.append((before, after))
        return seconds

    def synchronize(self, event: Event) -> None:
        event.wait()

    def mark_read(self, buffers: list[torch.Tensor]) -> Event:
        event = CudaEvent(self.runtime)
        event.record(current_raw_stream(self.device_index))
        return event

    def marker(self, on_copies: bool) -> Event:
        event = CudaEvent(self.runtime, timing=True)
        event.record(self.stream_handle if on_copies else current_raw_stream(self.device_index))
        return event

    def elapsed(self, start: Event, end: Event) -> float:
        return self.runtime.elapsed_seconds(start.handle, end.handle)


class CpuEvent:
    """A host event: set by whoever completes the work, at a time it keeps."""

    def __init__(self, done: bool = False):
        self._done = threading.Event()
        self.time: float | None = None
        if done:
            self.set()

    def set(self) -> None:
        self.time = time.perf_counter()
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()


class DelayedCopyEngine:
    """The CPU stand-in: each copy completes `delay_s` late on one worker thread (copies run in order).
    CPU compute is synchronous, so a reader event is complete when recorded; the refill rule is
    checked logically: `violations` lists copies into a buffer whose last reader was not `after`."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.violations: list[str] = []
        self._stalled_s = 0.0
        self._last_reader: dict[int, CpuEvent] = {}
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None  # started by the first copy

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool = False) -> Event:
        reader = self._last_reader.get(dst.data_ptr())
        if reader is not None and reader is not after:
            self.violations.append(f"buffer at {dst.data_ptr():#x} refilled without waiting for its last reader")
        done = CpuEvent()
        self._start_worker()
        self._queue.put((dst, src, after, done))
        return done

    def wait(self, events: list[Event]) -> None:
        start = time.perf_counter()
        for event in events:
            event.wait()
        self._stalled_s += time.perf_counter() - start

    def stall_seconds(self) -> float:
        seconds, self._stalled_s = self._stalled_s, 0.0
        return seconds

    def synchronize(self, event: Event) -> None:
        event.wait()

    def mark_read(self, buffers: list[torch.Tensor]) -> Event:
        event = CpuEvent(done=True)
        for buffer in buffers:
            self._last_reader[buffer.data_ptr()] = event
        return event

    def marker(self, on_copies: bool) -> Event:
        if not on_copies:
            return CpuEvent(done=True)  # compute is synchronous
        done = CpuEvent()
        self._start_worker()
        self._queue.put((None, None, None, done))  # set when the worker gets there
        return done

    def elapsed(self, start: Event, end: Event) -> float:
        return end.time - start.time

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, daemon=True, name="moetier-copy")
            self._worker.start()

    def _work(self) -> None:
        while True:
            dst, src, after, done = self._queue.get()
            if dst is None:  # a marker
                done.set()
                continue
            if after is not None:
                after.wait()
            if self.delay_s:
                time.sleep(self.delay_s)
            dst.copy_(src)
            done.set()


def make_copy_engine(device: torch.device) -> CopyEngine:
    return CudaCopyEngine(device) if device.type == "cuda" else DelayedCopyEngine()
