"""AsyncEngine: the synchronous Engine driven by one background thread, for the asyncio server.

The engine thread owns the Engine: only it calls add_request / step / abort, so torch never runs
on the event loop. The loop hands work over through a thread-safe inbox; after each step the
thread sends the outputs back with `loop.call_soon_threadsafe`, and the loop routes them into
each HTTP request's asyncio queue. Continuous batching is the Engine's own: sequences join and
leave the running batch at token granularity and long prompts are prefilled in chunks.

Admission is decided on the loop side: at most `max_num_seqs` running plus `max_queue` waiting
sequences are accepted; beyond that `submit` raises `ServerBusy` (HTTP 429). Aborting (a client
that went away) frees the slot at once for admission, and the engine frees the sequence's KV
blocks before it runs the next step.
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from moetier.engine.engine import Engine, RequestOutput
from moetier.errors import MoetierError
from moetier.sampling_params import SamplingParams
from moetier.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

_STOP = object()
OFFLOAD_STATS_PERIOD_S = 1.0


class ServerBusy(Exception):
    """The running batch and the waiting queue are full: answer 429 and let the client retry."""


class EngineFailed(Exception):
    """The engine raised while stepping; the sequences in flight were dropped."""


@dataclass
class _SeqState:
    """Loop-side bookkeeping of one engine sequence."""

    handle: "RequestHandle"
    index: int
    arrival: float
    last_token_time: float | None = None


@dataclass
class _Add:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    seq_id: str


@dataclass
class RequestHandle:
    """The sequences of one HTTP request (prompts x n choices). Iterate for (index, RequestOutput)
    until every sequence finished; `abort()` drops whatever still runs."""

    owner: "AsyncEngine"
    seq_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self):
        self._unfinished = set(range(len(self.seq_ids)))

    @property
    def done(self) -> bool:
        return not self._unfinished

    def __aiter__(self):
        return self._outputs()

    async def _outputs(self):
        while self._unfinished:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                self._unfinished.discard(index)
                raise item
            if item.finished:
                self._unfinished.discard(index)
            yield index, item

    def abort(self) -> None:
        for seq_id in self.seq_ids:
            self.owner.abort(seq_id)


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, metrics: ServerMetrics | None = None):
        if max_queue < 0:
            raise MoetierError("max_queue must be >= 0")
        self.engine = engine
        self.max_running = engine.config.max_num_seqs
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self._seqs: dict[str, _SeqState] = {}  # loop side: accepted, not finished, not aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.num_running = 0  # published by the engine thread after each step
        self._live: set[str] = set()  # engine-thread side: sequences added and not yet finished
        self._next_offload_stats = 0.0

    # --- loop side -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queue

    @property
    def num_in_flight(self) -> int:
        return len(self._seqs)

    @property
    def queue_depth(self) -> int:
        return max(self.num_in_flight - self.num_running, 0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="moetier-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 30.0) -> None:
        """Aborts what is still in flight (its streams end with finish_reason "abort") and joins the thread."""
        if self._thread is None or self._stopped:
            return
        self._stopped = True
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %.0f s", timeout)

    def submit(self, request_id: str, prompts: list[tuple[list[int], SamplingParams]]) -> RequestHandle:
        """Queues the sequences of one request; raises ServerBusy when they do not fit."""
        if not self.alive:
            raise EngineFailed("the engine is not running")
        if len(prompts) > self.capacity:
            raise MoetierError(
                f"the request asks for {len(prompts)} sequences but this server holds at most {self.capacity} "
                f"(--max-num-seqs {self.max_running} + --max-queue {self.max_queue})"
            )
        if self.num_in_flight + len(prompts) > self.capacity:
            raise ServerBusy(
                f"the server is at capacity ({self.num_in_flight} sequences in flight, at most "
                f"{self.max_running} running + {self.max_queue} queued); retry later"
            )
        handle = RequestHandle(self, [f"{request_id}-{i}" for i in range(len(prompts))])
        now = time.monotonic()
        for index, (seq_id, (prompt_ids, params)) in enumerate(zip(handle.seq_ids, prompts)):
            self._seqs[seq_id] = _SeqState(handle, index, now)
            self.metrics.count_prompt(len(prompt_ids))
            self._inbox.put(_Add(seq_id, prompt_ids, params))
        return handle

    def abort(self, seq_id: str) -> None:
        """Drops a sequence: its slot is free for admission now, its KV blocks before the next step."""
        if self._seqs.pop(seq_id, None) is not None:
            self.metrics.count_finished("abort")
            self._inbox.put(_Abort(seq_id))

    def _dispatch(self, outputs: list[RequestOutput], step_end: float) -> None:
        for output in outputs:
            state = self._seqs.get(output.request_id)
            if state is None:  # aborted while the step ran
                continue
            if state.last_token_time is None:
                self.metrics.observe_ttft(step_end - state.arrival)
            else:
                self.metrics.observe_tpot(step_end - state.last_token_time)
            state.last_token_time = step_end
            if output.finished:
                del self._seqs[output.request_id]
                self.metrics.count_finished(output.finish_reason)
            state.handle.queue.put_nowait((state.index, output))

    def _dispatch_error(self, seq_ids: list[str], error: Exception) -> None:
        for seq_id in seq_ids:
            state = self._seqs.pop(seq_id, None)
            if state is not None:
                self.metrics.count_finished("error")
                state.handle.queue.put_nowait((state.index, error))

    def _end_all(self) -> None:
        """On stop: every stream still open ends with finish_reason "abort"."""
        for seq_id, state in list(self._seqs.items()):
            del self._seqs[seq_id]
            self.metrics.count_finished("abort")
            output = RequestOutput(seq_id, [], [], "", "abort")
            state.handle.queue.put_nowait((state.index, output))

    def _to_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # --- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            for command in self._take_commands(block=not engine.has_unfinished()):
                if command is _STOP:
                    self._stop_in_thread()
                    return
                self._apply(command)
            if engine.has_unfinished():
                self._step()
            self._publish_gauges()

    def _take_commands(self, block: bool) -> list:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            self._live.discard(command.seq_id)
            self.engine.abort(command.seq_id)
            return
        try:
            self.engine.add_request(command.prompt_ids, command.params, command.seq_id)
            self._live.add(command.seq_id)
        except MoetierError as e:
            self._to_loop(self._dispatch_error, [command.seq_id], e)
        except Exception as e:  # a bug, not a user mistake: report it on this request only
            log.exception("add_request failed")
            self._to_loop(self._dispatch_error, [command.seq_id], EngineFailed(f"add_request failed: {e}"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; dropping %d sequences in flight", len(self._live))
            failed = sorted(self._live)
            for seq_id in failed:
                self.engine.abort(seq_id)
            self._live.clear()
            self._to_loop(self._dispatch_error, failed, EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
            return
        step_end = time.monotonic()
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        if outputs:
            self.metrics.count_step(len(outputs), step_end)
            self._to_loop(self._dispatch, outputs, step_end)

    def _publish_gauges(self) -> None:
        self.num_running = len(self.engine.scheduler.running)
        now = time.monotonic()
        if now >= self._next_offload_stats:
            # Engine.offload_stats() -> {"hit_rate": 0.93, ...} (None when resident) becomes the gauges
            # moetier_expert_cache_hit_rate, ... It runs here, on the engine thread, so it may read torch.
            self._next_offload_stats = now + OFFLOAD_STATS_PERIOD_S
            try:
                stats = self.engine.offload_stats() or {}
                self.metrics.set_engine_gauges({f"expert_cache_{k}": float(v) for k, v in stats.items()})
            except Exception:
                log.exception("offload_stats() failed")

    def _stop_in_thread(self) -> None:
        for seq_id in sorted(self._live):
            self.engine.abort(seq_id)
        self._live.clear()
        self.num_running = 0
        self._to_loop(self._end_all)
