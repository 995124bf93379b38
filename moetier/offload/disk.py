"""PackedExpertFile: the disk tier, one file of packed experts read with O_DIRECT.

Expert i occupies bytes [i * stride, i * stride + slot_bytes) of a file in the cache directory
(stride = slot_bytes rounded up to BLOCK, so every read is block-aligned): unlinked at creation, or,
named by a key of the checkpoint, built once and kept for later runs. The loader
writes through a shared mapping; `finish_writing` syncs it, unmaps it and drops the file's pages
from the page cache, so no RAM stays held. From then on `read_into` is the only way in: O_DIRECT
reads (split into chunks read by a few threads: os.preadv releases the GIL) into an aligned
buffer, which the caller then copies to the device. The page cache is never a hidden RAM tier.
Where O_DIRECT is not available (tmpfs, or the open or a probe read fails), reads are buffered and
each read range is dropped from the page cache afterwards; `direct` says which mode is in use.
"""

import errno
import gc
import mmap
import os
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moetier.errors import MoetierError

BLOCK = 4096  # O_DIRECT alignment of file offsets, lengths and buffer addresses
DEFAULT_READ_THREADS = 4
MIN_CHUNK_BYTES = 1 << 20  # a read is split into at most one chunk per thread, none smaller


def expert_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moetier" / "experts"


def round_up(nbytes: int, multiple: int = BLOCK) -> int:
    return -(-nbytes // multiple) * multiple


class PackedExpertFile:
    """`count` experts of `slot_bytes`, each at a multiple of `stride`. Unnamed: an unlinked file
    that disappears with the process. Named (a key of the checkpoint and the layout): built once as
    `<name>.experts` in the directory and reused by every later run that asks for the same name;
    `reused` says whether this one was (nothing to write then)."""

    def __init__(self, count: int, slot_bytes: int, directory: Path | str | None = None,
                 direct: bool | None = None, threads: int = DEFAULT_READ_THREADS, name: str | None = None):
        """`direct`: None uses O_DIRECT where the filesystem supports it, False forces buffered reads,
        True raises where O_DIRECT is unavailable."""
        if count < 1 or slot_bytes < 1:
            raise ValueError("a packed expert file holds at least one expert of at least one byte")
        self.count, self.slot_bytes, self.stride = count, slot_bytes, round_up(slot_bytes)
        directory = Path(directory or expert_cache_dir())
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoetierError(f"cannot create the disk tier's directory {directory}: {e.strerror} "
                               "(set XDG_CACHE_HOME to a writable place, or raise --cpu-memory)") from None
        final = directory / f"{name}.experts" if name else None
        self.reused = final is not None and final.is_file() and final.stat().st_size == self.nbytes
        self._building: tuple[Path, Path] | None = None  # (partial, final) until finish_writing
        if self.reused:
            path, fd = str(final), os.open(final, os.O_RDONLY)
        elif final is not None:  # built under a private name, renamed into place once complete
            path = str(directory / f"{name}.experts.partial-{os.getpid()}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._building = (Path(path), final)
        else:
            fd, path = tempfile.mkstemp(dir=directory, prefix="experts-")
        try:
            if not self.reused:
                _reserve(fd, self.nbytes, directory)
            self._direct_fd = _open_direct(path) if direct is not False and not _on_tmpfs(directory) else None
        except BaseException:
            os.close(fd)
            self._discard_partial()
            raise
        finally:
            if final is None:
                os.unlink(path)  # the open descriptors keep the data; it disappears with the process
        if direct and self._direct_fd is None:
            os.close(fd)
            self._discard_partial()
            raise MoetierError(f"O_DIRECT reads are not supported in {directory}")
        self._fd = fd
        self.direct = self._direct_fd is not None
        if not self.direct:  # no readahead: it would cache bytes beyond each read's range
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._mapping: mmap.mmap | None = None if self.reused else mmap.mmap(fd, self.nbytes)
        self._bytes: torch.Tensor | None = (
            None if self._mapping is None else torch.from_numpy(np.frombuffer(self._mapping, dtype=np.uint8))
        )
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="moetier-disk") if threads > 1 else None
        self._chunks = max(1, threads)
        partial = self._building[0] if self._building else None
        self._finalizer = weakref.finalize(self, _release, [fd, self._direct_fd], self._threads, partial)

    def _discard_partial(self) -> None:
        if self._building is not None:
            self._building[0].unlink(missing_ok=True)

    @property
    def writable(self) -> bool:
        return self._mapping is not None

    @property
    def nbytes(self) -> int:
        return self.count * self.stride

    def view(self, index: int) -> torch.Tensor:
        """The writable uint8 [slot_bytes] bytes of expert `index`, until finish_writing."""
        if self._bytes is None:
            raise RuntimeError("the packed expert file is no longer writable (finish_writing was called)")
        start = self._index(index) * self.stride
        return self._bytes[start : start + self.slot_bytes]

    def finish_writing(self) -> None:
        """Syncs and unmaps the written experts and drops them from the page cache. Every view must
        be gone: a view that outlives the mapping would keep it (and its pages) alive."""
        if self._mapping is None:
            return
        self._mapping.flush()
        self._bytes = None  # the last tensor on the mapping, unless a caller still holds a view
        try:
            self._mapping.close()
        except BufferError:
            gc.collect()  # views kept only by reference cycles (a stored traceback's frames)
            try:
                self._mapping.close()
            except BufferError:
                raise RuntimeError("a view of the packed expert file outlived loading; drop it first") from None
        self._mapping = None
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if self._building is not None:  # the finalizer's removal of the partial file is a no-op from here
            os.fsync(self._fd)
            os.replace(*self._building)  # atomic: a later run sees a complete file or none
            self._building = None

    def read_into(self, index: int, out: torch.Tensor) -> None:
        """Reads expert `index` into out[:slot_bytes] (out: contiguous CPU uint8 of at least stride
        bytes, BLOCK-aligned for O_DIRECT); out[slot_bytes:stride] receives the block padding."""
        if self._mapping is not None:
            raise RuntimeError("the packed expert file is still being written (call finish_writing first)")
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < self.stride:
            raise ValueError(f"read_into needs a contiguous CPU uint8 tensor of at least {self.stride} bytes")
        if self.direct and out.data_ptr() % BLOCK:
            raise ValueError(f"O_DIRECT reads need a {BLOCK}-byte aligned buffer")
        target = memoryview(out.numpy())
        offset = self._index(index) * self.stride
        step = max(MIN_CHUNK_BYTES, round_up(-(-self.stride // self._chunks)))
        chunks = [(start, min(start + step, self.stride)) for start in range(0, self.stride, step)]
        if self._threads is None or len(chunks) == 1:
            for start, end in chunks:
                self._read(target[start:end], offset + start)
        else:
            for done in [self._threads.submit(self._read, target[start:end], offset + start) for start, end in chunks]:
                done.result()

    def close(self) -> None:
        self._bytes = None
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        self._finalizer()

    def _index(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"expert index {index} out of range for a file of {self.count}")
        return index

    def _read(self, target: memoryview, offset: int) -> None:
        fd = self._direct_fd if self.direct else self._fd
        done = 0
        while done < len(target):
            n = os.preadv(fd, [target[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"unexpected end of the packed expert file at byte {offset + done}")
            done += n
        if not self.direct:
            os.posix_fadvise(fd, offset, len(target), os.POSIX_FADV_DONTNEED)


def _reserve(fd: int, nbytes: int, directory: Path) -> None:
    """Allocates the whole file now: a full disk fails here, not as SIGBUS on a mapped write."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise MoetierError(f"the disk tier needs {nbytes} bytes in {directory}: {e.strerror} "
                           "(free space there, set XDG_CACHE_HOME elsewhere, or raise --cpu-memory)") from e


def _open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor of the file, or None if the open or an aligned probe read fails."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    probe = mmap.mmap(-1, BLOCK)  # anonymous mappings are page-aligned
    try:
        os.preadv(fd, [probe], 0)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        probe.close()


def _on_tmpfs(directory: Path) -> bool:
    """True where the directory's filesystem keeps files in RAM anyway (O_DIRECT would mean nothing)."""
    dev = os.stat(directory).st_dev
    device = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                if fields[2] == device:
                    return fields[fields.index("-") + 1] in ("tmpfs", "ramfs")
    except OSError:
        pass
    return False


def _release(fds: list[int | None], threads: ThreadPoolExecutor | None, partial: Path | None) -> None:
    """Closes the file; a named file that was never completed is removed."""
    if threads is not None:
        threads.shutdown(wait=False)
    if partial is not None:
        partial.unlink(missing_ok=True)
    for fd in fds:
        if fd is not None:
            os.close(fd)
