"""Copy engines: host -> device expert copies that run beside compute, ordered by events.

The interface: `copy(dst, src, after, timed)` starts a copy once the reader event `after`
(the last kernel that read dst) has completed and returns the copy's event (a timing one only if
`timed`: one after every copy slowed back-to-back 9.4 MB copies from 53.8 to 53.5 GB/s on the device H100,
benchmarks/copy_events.py); copies complete in the order issued; `wait(events, timed)` makes
compute wait for copies, and `stall_seconds()` says how long it stood still for the waits that were `timed`;
`synchronize(event)` blocks the host until a copy has completed (before its source is
overwritten); `mark_read(buffers)` returns an event recorded after the compute issued so far, which
the caller keeps as the last reader of those buffers, and `reads_complete()` says that all of those made so
far have completed (once the host has seen the GPU pass them); `marker(on_copies)` returns a timing event
that completes when the copies (or the compute) issued so far have, and `elapsed(a, b)` the
seconds between two completed markers. Copies issued together go inside `with engine.issuing():`,
which sets up the copy stream once for all of them.

CudaCopyEngine: a dedicated copy stream, non-blocking copies from pinned memory (cudaMemcpyAsync of the
runtime torch loaded, called through ctypes, else torch's copy_), CUDA events; compute waits on the
device (no host sync), only `synchronize` blocks the host. DelayedCopyEngine: the CPU
stand-in for tests; it copies on a worker thread after an injected delay, so a missing wait reads
stale bytes and gives wrong numbers, and it records every copy into a buffer whose last reader was
not given as `after`.
"""

import contextlib
import ctypes
import operator
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import ContextManager, Protocol

import torch


class Event(Protocol):
    def wait(self) -> None:
        """Blocks the host until the event has completed."""
        ...

    def query(self) -> bool:
        """Whether the event has completed (never blocks)."""
        ...


class CopyEngine(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool = False) -> Event: ...

    def issuing(self) -> ContextManager[None]: ...

    def wait(self, events: list[Event], timed: bool = True) -> None:
        """Compute waits for these copies (if `timed`, its standing still is measured)."""
        ...

    def stall_seconds(self) -> float:
        """Seconds compute has waited for copies in timed waits since the last call (waits still in flight
        excluded)."""
        ...

    def synchronize(self, event: Event) -> None:
        """Blocks the host until the event has completed."""
        ...

    def mark_read(self, buffers: list[torch.Tensor]) -> Event: ...

    def reads_complete(self) -> None:
        """Every reader event mark_read returned so far has completed (the caller saw the GPU pass work queued
        after them): a copy after one of them need not ask."""
        ...

    def marker(self, on_copies: bool) -> Event: ...

    def elapsed(self, start: Event, end: Event) -> float: ...


_NOTHING_WAITED = object()  # a batch has started copying but waited for no reader yet
# Untimed copy events are recorded again in turn (a new event cost ~2.4 us of host time against ~0.6 to record
# one again, on the device H100: benchmarks/host_call_costs.py). One recorded again stands for a later copy
# than its holder's: waiting on it, or asking it, waits for more than needed but never for less. With this
# many, a copy's event is reused ~70 batch-1 layer steps of Qwen3-30B-A3B later, long after its compute waited.
COPY_EVENTS = 512
_NO_SETUP = contextlib.nullcontext()
_HOST_TO_DEVICE = 1  # cudaMemcpyKind


def runtime_memcpy() -> Callable[[int, int, int, int], None] | None:
    """cudaMemcpyAsync(dst, src, bytes, host to device, stream) of the CUDA runtime library torch loaded,
    through ctypes, or None where no such library is mapped (a static build: copies go through torch).
    ~2 us of host time a call where torch's copy_ took ~9 us and making the copy stream current ~5 us
    more (measured on the device H100), all before each layer's first copy can start."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    memcpy = ctypes.CDLL(paths.pop()).cudaMemcpyAsync
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    memcpy.restype = ctypes.c_int

    def copy(dst: int, src: int, nbytes: int, stream: int) -> None:
        status = memcpy(dst, src, nbytes, _HOST_TO_DEVICE, stream)
        if status:
            raise RuntimeError(f"cudaMemcpyAsync failed: CUDA error {status}")
    return copy


_streams_by_id: dict[tuple[int, int], torch.cuda.Stream] = {}


def current_stream(device_index: int) -> torch.cuda.Stream:
    """torch.cuda.current_stream(device_index) without making a Stream object each call (inside a device
    context: ~6 us of host time a call on the device H100, several calls a MoE layer,
    benchmarks/host_call_costs.py): the objects are kept by stream id."""
    key = (device_index, torch._C._cuda_getCurrentStream(device_index)[0])
    stream = _streams_by_id.get(key)
    if stream is None:
        stream = _streams_by_id[key] = torch.cuda.current_stream(device_index)
    return stream


class CudaCopyEngine:
    def __init__(self, device: torch.device):
        # An int: torch.cuda.current_stream(torch.device) resolves the device through a slow path.
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.Stream(device)
        self.memcpy = runtime_memcpy()  # None: torch's copy_ on the copy stream made current
        self._copy_events: list[_NumberedEvent] = []  # the untimed ones, recorded again in turn (COPY_EVENTS)
        self._copies = 0  # copies issued
        self._stalls: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._spare_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # read stall pairs, recorded again
        self._batch: contextlib.ExitStack | None = None  # while issuing through torch: holds the copy stream once current
        self._waited: Event | None = None  # the reader event the stream last waited for
        self._reads_marked = 0  # reader events made
        self._reads_done = 0  # of those, the first this many have completed (reads_complete)

    def issuing(self) -> ContextManager[None]:
        """A batch of copies: copies through torch make the copy stream current at the first and keep it
        so until the batch ends (switching streams per copy cost more host time than the copy's launch).
        Copies through the runtime name their stream: nothing to set up."""
        return _NO_SETUP if self.memcpy is not None else self._torch_batch()

    @contextlib.contextmanager
    def _torch_batch(self) -> Iterator[None]:
        if self._batch is not None:
            yield
            return
        self._batch, self._waited = contextlib.ExitStack(), None
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            batch.close()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool = False) -> Event:
        if self.memcpy is None:
            return self._copy_through_torch(dst, src, after, timed)
        # A reader that completed needs no wait: after the routing read, every one recorded before it (a
        # stream wait cost ~6 us of host time before a layer's first copy, and its launch ~2 us more); nor a
        # query when it is known to have (a query took ~3.5 us while the GPU was busy, on the device H100).
        if after is not None and after is not self._waited and after.seq > self._reads_done and not after.query():
            self.stream.wait_event(after)
            self._waited = after  # the stream keeps its order: a later copy after the same reader need not wait
        # both contiguous bytes; the source pinned and kept by the store until the copy completed
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        self.memcpy(dst.data_ptr(), src.data_ptr(), dst.nbytes, self.stream.cuda_stream)
        return self._copied(timed)

    def _copy_through_torch(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None, timed: bool) -> Event:
        if self._batch is None:
            with self.issuing():
                return self._copy_through_torch(dst, src, after, timed)
        if self._waited is None:  # the batch's first copy
            self._batch.enter_context(torch.cuda.stream(self.stream))
            self._waited = _NOTHING_WAITED
        if after is not None and after is not self._waited:  # slots read by one round share their reader
            self.stream.wait_event(after)
            self._waited = after
        dst.copy_(src, non_blocking=True)
        return self._copied(timed)

    def _copied(self, timed: bool) -> Event:
        if timed:
            done = _NumberedEvent(enable_timing=True)
        elif len(self._copy_events) < COPY_EVENTS:
            done = _NumberedEvent()
            self._copy_events.append(done)
        else:
            done = self._copy_events[self._copies % COPY_EVENTS]
        self._copies += 1
        done.seq = self._copies
        done.record(self.stream)
        return done

    def wait(self, events: list[Event], timed: bool = True) -> None:
        """The compute stream waits on the device, for the last copy issued of `events` alone (the copy stream
        completes the others first). If `timed`, a timing event on each side of the wait measures how long it
        stood still (it has nothing else queued between them)."""
        if not events:
            return
        stream = current_stream(self.device_index)
        last = max(events, key=_ISSUE_ORDER)
        if not timed:
            stream.wait_event(last)
            return
        if self._spare_pairs:  # recording an event again costs a third of making one
            before, after = self._spare_pairs.pop()
        else:
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(last)
        after.record(stream)
        self._stalls.append((before, after))

    def stall_seconds(self) -> float:
        seconds = 0.0
        while self._stalls and self._stalls[0][1].query():
            before, after = self._stalls.popleft()
            seconds += before.elapsed_time(after) / 1e3
            self._spare_pairs.append((before, after))
        return seconds

    def synchronize(self, event: Event) -> None:
        event.synchronize()  # torch.cuda.Event.wait() would be a stream wait, not a host wait

    def mark_read(self, buffers: list[torch.Tensor]) -> Event:
        event = _NumberedEvent()
        event.record(current_stream(self.device_index))
        self._reads_marked += 1
        event.seq = self._reads_marked
        return event

    def reads_complete(self) -> None:
        self._reads_done = self._reads_marked

    def marker(self, on_copies: bool) -> Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream if on_copies else current_stream(self.device_index))
        return event

    def elapsed(self, start: Event, end: Event) -> float:
        return start.elapsed_time(end) / 1e3


class _NumberedEvent(torch.cuda.Event):
    """An event numbered at its latest recording: reader events in the order mark_read made them, copy events
    in the order the copies were issued."""
    seq: int


_ISSUE_ORDER = operator.attrgetter("seq")


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

    def issuing(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def wait(self, events: list[Event], timed: bool = True) -> None:
        start = time.perf_counter()
        for event in events:
            event.wait()
        if timed:
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

    def reads_complete(self) -> None:
        pass  # compute is synchronous: its readers complete when recorded

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
