"""The CUDA runtime calls of the offload hot path, made straight through ctypes on the libcudart that torch
loaded (so on torch's context and streams): expert copies, and the events that order them against compute.

At batch-1 decode the host's work between a MoE layer's routing read and the launch of the next layer's graph
is the critical path whenever the host slows (results README, sessions 12-13), and torch's wrappers cost
several times the runtime's own work there: a new event recorded 3.2 us against ~1 for the runtime's calls
and a copy_ 8.9 us against cudaMemcpyAsync's ~2 (benchmarks/host_call_costs.py on the device H100).
The calls that return at once hold the GIL (ctypes.PyDLL): releasing it for a microsecond would let another
Python thread take it for a whole switch interval. Only a host wait for an event releases it.
"""

import ctypes
from functools import cache

import torch

_HOST_TO_DEVICE = 1  # cudaMemcpyKind
_NOT_READY = 600  # cudaErrorNotReady
_DISABLE_TIMING = 0x2  # cudaEventDisableTiming


class CudaRuntime:
    def __init__(self, path: str):
        calls = ctypes.PyDLL(path)  # holds the GIL
        blocking = ctypes.CDLL(path)  # releases it
        void_p, c_int = ctypes.c_void_p, ctypes.c_int

        def bind(lib, name: str, *argtypes):
            function = getattr(lib, name)
            function.argtypes, function.restype = list(argtypes), c_int
            return function

        self._memcpy = bind(calls, "cudaMemcpyAsync", void_p, void_p, ctypes.c_size_t, c_int, void_p)
        self._create = bind(calls, "cudaEventCreateWithFlags", ctypes.POINTER(void_p), ctypes.c_uint)
        self._destroy = bind(calls, "cudaEventDestroy", void_p)
        self._record = bind(calls, "cudaEventRecord", void_p, void_p)
        self._query = bind(calls, "cudaEventQuery", void_p)
        self._stream_wait = bind(calls, "cudaStreamWaitEvent", void_p, void_p, ctypes.c_uint)
        self._elapsed = bind(calls, "cudaEventElapsedTime", ctypes.POINTER(ctypes.c_float), void_p, void_p)
        self._last_error = bind(calls, "cudaGetLastError")
        self._graph_launch = bind(calls, "cudaGraphLaunch", void_p, void_p)
        self._synchronize = bind(blocking, "cudaEventSynchronize", void_p)

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync from pinned host memory: the copy is queued on `stream`."""
        _check(self._memcpy(dst, src, nbytes, _HOST_TO_DEVICE, stream), "cudaMemcpyAsync")

    def create_event(self, timing: bool) -> int:
        handle = ctypes.c_void_p()
        _check(self._create(ctypes.byref(handle), 0 if timing else _DISABLE_TIMING), "cudaEventCreateWithFlags")
        return handle.value

    def destroy_event(self, event: int) -> None:
        self._destroy(event)  # at exit the runtime may be gone already: nothing to report then

    def record(self, event: int, stream: int) -> None:
        _check(self._record(event, stream), "cudaEventRecord")

    def query(self, event: int) -> bool:
        status = self._query(event)
        if status == _NOT_READY:
            self._last_error()  # not an error: cleared, so that torch's next check does not report it
            return False
        _check(status, "cudaEventQuery")
        return True

    def stream_wait(self, stream: int, event: int) -> None:
        """The stream's later work waits (on the device) for the event's last record."""
        _check(self._stream_wait(stream, event, 0), "cudaStreamWaitEvent")

    def synchronize(self, event: int) -> None:
        """Blocks the host (the GIL released) until the event's last record has completed."""
        _check(self._synchronize(event), "cudaEventSynchronize")

    def launch_graph(self, graph_exec: int, stream: int) -> None:
        """cudaGraphLaunch of an instantiated graph (torch.cuda.CUDAGraph.raw_cuda_graph_exec()) on `stream`."""
        _check(self._graph_launch(graph_exec, stream), "cudaGraphLaunch")

    def elapsed_seconds(self, start: int, end: int) -> float:
        milliseconds = ctypes.c_float()
        _check(self._elapsed(ctypes.byref(milliseconds), start, end), "cudaEventElapsedTime")
        return milliseconds.value / 1e3


class CudaEvent:
    """A runtime event (timing or not), recorded again as often as needed; destroyed with the object."""
    __slots__ = ("runtime", "handle")

    def __init__(self, runtime: CudaRuntime, timing: bool = False):
        self.runtime = runtime
        self.handle = runtime.create_event(timing)

    def __del__(self):
        self.runtime.destroy_event(self.handle)

    def record(self, stream: int) -> None:
        self.runtime.record(self.handle, stream)

    def query(self) -> bool:
        return self.runtime.query(self.handle)

    def wait(self) -> None:
        """Blocks the host until the event has completed."""
        self.runtime.synchronize(self.handle)


@cache
def cuda_runtime() -> CudaRuntime:
    """The runtime library torch mapped into this process (after torch initialized CUDA)."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        paths = set()
    if len(paths) != 1:
        raise RuntimeError(
            "offloading needs the CUDA runtime library (libcudart.so) that torch loads, to queue expert copies and "
            f"events without torch's per-call overhead; this process maps {sorted(paths) or 'none'} (a torch built "
            "with the runtime linked statically?). Install a PyPI or conda build of torch, or run the model resident.")
    return CudaRuntime(paths.pop())


def current_raw_stream(device_index: int) -> int:
    """The current stream of the device, as a cudaStream_t."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def _check(status: int, call: str) -> None:
    if status:
        raise RuntimeError(f"{call} failed: CUDA error {status}")
