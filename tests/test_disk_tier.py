"""The disk tier (CPU): a packed expert file read with O_DIRECT (or buffered reads where the filesystem
has no O_DIRECT) returns exactly the bytes written; once loading ends no mapping and no page cache
holds it; the staging ring never refills a buffer whose copy to the device is still pending."""

import ctypes
import mmap
import os

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

from moetier import LLM, SamplingParams
from moetier.errors import MoetierError
from moetier.moe.experts import ExpertId, ExpertLayout
from moetier.offload import disk as disk_module
from moetier.offload import store as store_module
from moetier.offload.copy_engine import DelayedCopyEngine
from moetier.offload.disk import BLOCK, PackedExpertFile
from moetier.offload.store import ExpertStore

PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]

pytestmark = pytest.mark.usefixtures("one_thread")


def _aligned(nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    start = -buffer.data_ptr() % BLOCK
    return buffer[start : start + nbytes]


def _written(tmp_path, count: int, slot_bytes: int, **options) -> tuple[PackedExpertFile, torch.Tensor]:
    file = PackedExpertFile(count, slot_bytes, directory=tmp_path, **options)
    data = torch.randint(0, 256, (count, slot_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    for i in range(count):
        file.view(i).copy_(data[i])
    file.finish_writing()
    return file, data


def _mapped_inodes() -> set[tuple[str, int]]:
    """(permissions, inode) of every file mapping of this process."""
    with open("/proc/self/maps") as maps:
        return {(fields[1], int(fields[4])) for fields in map(str.split, maps) if int(fields[4])}


def _cached_pages(fd: int, nbytes: int) -> int:
    """Pages of the file in the page cache (mincore over a fresh read-only mapping)."""
    mapping = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
    array = np.frombuffer(mapping, dtype=np.uint8)
    pages = (ctypes.c_ubyte * (-(-nbytes // mmap.PAGESIZE)))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(nbytes), pages) == 0
    del array
    mapping.close()
    return sum(page & 1 for page in pages)


@pytest.mark.parametrize("direct", [None, False], ids=["auto", "buffered"])
@pytest.mark.parametrize("slot_bytes,threads", [(1, 4), (BLOCK, 1), (10_000, 4), ((3 << 20) + 123, 1), ((3 << 20) + 123, 4)])
def test_read_into_returns_the_bytes_written(tmp_path, direct, slot_bytes, threads):
    """Every index (the last included); slots not a multiple of the block; one chunk and several."""
    file, data = _written(tmp_path, 5, slot_bytes, direct=direct, threads=threads)
    assert file.stride % BLOCK == 0 and file.stride - BLOCK < slot_bytes <= file.stride
    assert direct is None or not file.direct
    out = _aligned(file.stride)
    for i in reversed(range(5)):
        out.fill_(0xAB)
        file.read_into(i, out)
        assert torch.equal(out[:slot_bytes], data[i]), f"expert {i}"
    with pytest.raises(IndexError):
        file.read_into(5, out)
    if file.direct:
        with pytest.raises(ValueError, match="aligned"):
            file.read_into(0, _aligned(file.stride + 1)[1:])


@pytest.mark.parametrize("direct", [None, False], ids=["auto", "buffered"])
def test_finished_file_holds_no_mapping_and_no_page_cache(tmp_path, direct):
    file = PackedExpertFile(8, (1 << 20) + 5, directory=tmp_path, direct=direct)
    inode = os.fstat(file._fd).st_ino
    view = file.view(7)
    view.fill_(7)
    assert ("rw-s", inode) in _mapped_inodes()
    with pytest.raises(RuntimeError, match="outlived loading"):  # a held view keeps the mapping alive
        file.finish_writing()
    del view
    assert _cached_pages(file._fd, file.nbytes) > 0
    file.finish_writing()
    assert not file.writable and not any(node == inode for _, node in _mapped_inodes())
    assert _cached_pages(file._fd, file.nbytes) == 0
    out = _aligned(file.stride)
    for i in range(8):
        file.read_into(i, out)
    assert bool((out[: file.slot_bytes] == 7).all())
    assert _cached_pages(file._fd, file.nbytes) == 0  # reads leave nothing behind, in either mode
    with pytest.raises(RuntimeError, match="no longer writable"):
        file.view(0)


def test_mode_follows_the_filesystem(tmp_path):
    if os.path.isdir("/dev/shm") and disk_module._on_tmpfs(os.path.realpath("/dev/shm")):
        assert not PackedExpertFile(1, 10, directory="/dev/shm").direct  # tmpfs: buffered, no O_DIRECT
    auto = PackedExpertFile(1, 10, directory=tmp_path)
    print(f"{tmp_path}: direct={auto.direct}")
    if not auto.direct:
        with pytest.raises(MoetierError, match="O_DIRECT"):
            PackedExpertFile(1, 10, directory=tmp_path, direct=True)


def _disk_store(monkeypatch, tmp_path, staging_buffers: int, direct_io: bool | None = None):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    layout = ExpertLayout(48, 40, torch.float32, bias=True)  # 24,064-byte experts: not whole blocks
    store = ExpertStore(layout, (0, 2), 4, host_experts=3, staging_buffers=staging_buffers, direct_io=direct_io)
    experts = list(store.parts)
    generator = torch.Generator().manual_seed(0)
    for expert in experts:
        for view in store.parts[expert].values():
            view.copy_(torch.randn(view.shape, generator=generator))
    del view  # no view of the file may outlive loading
    expected = {e: torch.cat([p.reshape(-1) for p in store.parts[e].values()]) for e in experts}
    store.finish_loading()
    return store, experts, expected


def _copy_all(store: ExpertStore, experts: list[ExpertId], engine: DelayedCopyEngine) -> dict:
    """Every expert into its own destination, twice over, then waits for all of them."""
    dst = {e: torch.zeros(store.layout.slot_bytes, dtype=torch.uint8) for e in experts}
    events = [store.copy_in(e, dst[e], engine, None) for e in experts + experts[::-1]]
    engine.wait(events)
    return {e: torch.cat([p.reshape(-1) for p in store.layout.part_views(d).values()]) for e, d in dst.items()}


@pytest.mark.parametrize("staging_buffers", [1, 2])
def test_staging_ring_waits_for_each_copy(monkeypatch, tmp_path, staging_buffers):
    store, experts, expected = _disk_store(monkeypatch, tmp_path, staging_buffers)
    assert store.disk_experts == 5 and len(store.staging) == staging_buffers and len(store.buffers) == 3
    assert all(t.data_ptr() % BLOCK == 0 for t in store.staging)
    got = _copy_all(store, experts, DelayedCopyEngine(0.01))
    assert all(torch.equal(got[e], expected[e]) for e in experts)
    assert store.disk_bytes_read == 2 * 5 * store.disk.stride and store.disk_read_s > 0
    with pytest.raises(RuntimeError, match="on disk"):
        store.expert_part(experts[-1], "down")
    # The same copies with the host wait taken out overwrite staging bytes still waiting to be copied.
    monkeypatch.setattr(DelayedCopyEngine, "synchronize", lambda self, event: None)
    got = _copy_all(store, experts, DelayedCopyEngine(0.01))
    assert not all(torch.equal(got[e], expected[e]) for e in experts)


def test_buffered_store_gives_the_same_bytes(monkeypatch, tmp_path):
    store, experts, expected = _disk_store(monkeypatch, tmp_path, 2, direct_io=False)
    assert not store.disk.direct
    got = _copy_all(store, experts, DelayedCopyEngine(0.001))
    assert all(torch.equal(got[e], expected[e]) for e in experts)


def test_disk_experts_are_read_only_after_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    store = ExpertStore(ExpertLayout(16, 8, torch.float32, bias=False), (0,), 2, host_experts=1)
    with pytest.raises(RuntimeError, match="finish_loading"):
        store.copy_in(ExpertId(0, 1), torch.empty(store.layout.slot_bytes, dtype=torch.uint8), DelayedCopyEngine(), None)
    store.finish_loading()
    store.finish_loading()  # once is enough; again is a no-op
    assert set(store.parts) == {ExpertId(0, 0)}


def test_all_on_disk_with_a_one_buffer_ring_is_bitwise_resident(monkeypatch, tmp_path):
    """On the CPU, where the delayed copy engine makes a missing staging wait corrupt the experts."""
    path = tmp_path / "qwen3"
    make_checkpoint("qwen3_moe", path)
    options = {"dtype": "float32", "max_model_len": 128, "device": "cpu"}
    resident = LLM(str(path), **options)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = [resident.score(ids) for ids in PROMPTS], [o.token_ids for o in resident.generate(PROMPTS, params)]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(store_module, "DEFAULT_STAGING_BUFFERS", 1)
    llm = LLM(str(path), expert_slots=3, cpu_memory=store_module.staging_arena_bytes(resident.engine.executor.layout),
              **options)
    store = llm.engine.executor.store
    assert len(store.staging) == 1 and store.disk_experts == len(store.disk_index) > 0 and not store.disk.writable
    llm.engine.executor.copy_engine = copies = DelayedCopyEngine(0.002)
    assert all(torch.equal(llm.score(ids), expected) for ids, expected in zip(PROMPTS, ref[0]))
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == ref[1] and copies.violations == []
    assert store.disk_bytes_read > 0 and store.disk_bytes_read % store.disk.stride == 0


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_disk_tier_is_built_once_and_reused(monkeypatch, tmp_path, load_format):
    """The packed file is keyed by the checkpoint (or the dummy seed) and the layout: a second load
    writes nothing to it and gives the same outputs; a changed checkpoint gets a new file."""
    path = tmp_path / "qwen3"
    make_checkpoint("qwen3_moe", path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "moetier" / "experts"
    options = {"dtype": "float32", "max_model_len": 128, "device": "cpu", "load_format": load_format, "seed": 3}
    resident = LLM(str(path), **options)
    staging = store_module.staging_arena_bytes(resident.engine.executor.layout)
    first = LLM(str(path), expert_slots=3, cpu_memory=staging, **options)
    assert not first.engine.executor.store.disk.reused
    [built] = list(cache.iterdir())  # complete, under its final name; no partial file left
    assert built.suffix == ".experts"
    second = LLM(str(path), expert_slots=3, cpu_memory=staging, **options)
    store = second.engine.executor.store
    assert store.disk.reused and not store.disk.writable and store.expert_part(next(iter(store.disk_index)), "down") is None
    assert all(torch.equal(second.score(ids), resident.score(ids)) for ids in PROMPTS)
    shard = next(path.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the checkpoint changed
    third = LLM(str(path), expert_slots=3, cpu_memory=staging, **options)
    assert third.engine.executor.store.disk.reused == (load_format == "dummy")  # dummy: config and seed only
    assert len(list(cache.iterdir())) == (1 if load_format == "dummy" else 2)


def test_an_unusable_cache_directory_is_a_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(MoetierError, match="cannot create the disk tier's directory .*XDG_CACHE_HOME"):
        PackedExpertFile(2, 4096)


def test_an_unfinished_named_file_leaves_nothing(tmp_path):
    packed = PackedExpertFile(3, 5000, tmp_path, name="k")
    packed.view(0).fill_(1)
    assert [p.name for p in tmp_path.iterdir()] == [f"k.experts.partial-{os.getpid()}"]
    packed.close()  # as a process that fails while loading
    assert list(tmp_path.iterdir()) == []
    assert not PackedExpertFile(3, 5000, tmp_path, name="k").reused


@pytest.mark.gpu
@pytest.mark.parametrize("staging_buffers", [1, 4])
def test_disk_experts_reach_the_gpu_exactly(monkeypatch, tmp_path, staging_buffers):
    """O_DIRECT into pinned staging, CUDA copies, ring waits on CUDA events: every byte arrives."""
    from moetier.offload.copy_engine import CudaCopyEngine

    store, experts, expected = _disk_store(monkeypatch, tmp_path, staging_buffers)
    assert all(t.is_pinned() for t in store.staging)
    engine = CudaCopyEngine(torch.device("cuda"))
    dst = torch.zeros(len(experts), store.layout.slot_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):  # each destination rewritten: a copy from a refilled staging buffer would show
        events = [store.copy_in(e, dst[i], engine, None) for i, e in enumerate(experts)]
    engine.synchronize(events[-1])
    for i, e in enumerate(experts):
        got = torch.cat([p.reshape(-1) for p in store.layout.part_views(dst[i].cpu()).values()])
        assert torch.equal(got, expected[e]), str(e)
