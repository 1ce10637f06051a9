"""dmabufd's file loading on the product kernel: the method auto-selection
follows what the kernel proves it can do, and every method delivers the
file's bytes into real system-heap and udmabuf buffers. Runs inside the VM."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import dmabufd_client
from dmabufd_client import Access, LoadedFile
from tests.integration.test_load_paths import drop_cache, warm_cache


def make_file(path: Path, size: int) -> str:
    """Fill a file on the ext4 scratch disk; return its SHA-256."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def digest_of(loaded: LoadedFile) -> str:
    digest = hashlib.sha256()
    for segment in sorted(loaded.segments, key=lambda s: s.file_offset):
        with loaded.buffer_of(segment).map(Access.READ) as mapping:
            view = mapping.memoryview
            digest.update(view[segment.buffer_offset : segment.buffer_offset + segment.length])
            del view
    return digest.hexdigest()


def test_heaps_report_what_the_kernel_can_do(client: dmabufd_client.Client, patched: bool) -> None:
    methods = {heap.name: heap.load_methods for heap in client.heaps()}
    if patched:
        assert methods["system"] == ("direct-cfr", "buffered-read")
        assert methods["udmabuf"][0] == "direct-cfr"
    else:
        assert methods["system"] == ("buffered-read",)
        assert methods["udmabuf"][0] == "direct-read"
    assert "direct-cfr" not in methods["memfd"]


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_auto_picks_the_fastest_method_the_kernel_has(
    client: dmabufd_client.Client, scratch_dir: Path, patched: bool, heap: str
) -> None:
    path = scratch_dir / "weights.bin"
    expected = make_file(path, 8 << 20)
    with client.load_file(path, heap=heap, verify=True) as loaded:
        assert loaded.stats.verified
        assert digest_of(loaded) == expected
        if patched:
            assert loaded.method == "direct-cfr"
        else:
            assert loaded.method == ("buffered-read" if heap == "system" else "direct-read")


def test_load_by_usage_takes_the_heap_with_the_fastest_method(
    client: dmabufd_client.Client, scratch_dir: Path, patched: bool
) -> None:
    """model-weights routes system -> udmabuf -> memfd. With the series,
    direct copy_file_range into the system heap; without it, an O_DIRECT
    read into a udmabuf's memfd beats a buffered read into the heap."""
    path = scratch_dir / "by-usage.bin"
    expected = make_file(path, 4 << 20)
    with client.load_file(path, usage="model-weights") as loaded:
        assert digest_of(loaded) == expected
        heap = loaded.buffers[0].info.heap
        assert (heap, loaded.method) == (("system", "direct-cfr") if patched else ("udmabuf", "direct-read"))


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
@pytest.mark.parametrize(
    ("size", "offset", "length"),
    [(4096, 0, 0), (1 << 20, 1, 4095), ((3 << 20) + 17, 4097, 0), (256 << 20, 12345, (200 << 20) + 3)],
)
def test_every_method_loads_the_files_bytes(  # noqa: PLR0917 - pytest passes parameters positionally
    client: dmabufd_client.Client, scratch_dir: Path, heap: str, size: int, offset: int, length: int
) -> None:
    path = scratch_dir / f"data-{size}.bin"
    if not path.exists():
        make_file(path, size)
    want = length or size - offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        expected = hashlib.sha256(handle.read(want)).hexdigest()
    methods = next(h.load_methods for h in client.heaps() if h.name == heap)
    for method in methods:
        with client.load_file(path, offset=offset, length=length, heap=heap, method=method) as loaded:
            assert loaded.method == method
            assert loaded.stats.bytes == want
            assert digest_of(loaded) == expected, f"{method} into {heap}"
            if heap == "udmabuf":
                limit = int(Path("/sys/module/udmabuf/parameters/size_limit_mb").read_text()) << 20
                assert all(buffer.size <= limit for buffer in loaded.buffers), "split at udmabuf's limit"


def test_model_into_the_system_heap(client: dmabufd_client.Client, scratch_dir: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {"w": rng.standard_normal((512, 256)).astype(np.float32), "b": np.arange(7, dtype=np.int32)}
    save_file(tensors, str(scratch_dir / "m.safetensors"))
    with client.load_model(scratch_dir / "m.safetensors", heap="system", verify=True) as model:
        assert model.stats.verified
        assert not model.read_only_enforced, "a heap dma-buf cannot be made read-only"
        for name, expected in tensors.items():
            assert np.array_equal(model[name], expected)


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_cached_bytes_come_from_the_page_cache_into_each_heap(
    client: dmabufd_client.Client, scratch_dir: Path, heap: str
) -> None:
    """The kernel has cachestat, so a load asks it which chunks the page
    cache holds: a warm file is copied from there by every method, into
    real heap and udmabuf buffers, and a cold one is not."""
    path = scratch_dir / f"warm-{heap}.bin"
    size = (24 << 20) + 4097
    make_file(path, size)
    with open(path, "rb") as handle:
        expected = hashlib.sha256(handle.read()[5:]).hexdigest()  # and the file is cached now
    methods = next(h.load_methods for h in client.heaps() if h.name == heap)
    for method in methods:
        with client.load_file(path, offset=5, heap=heap, method=method) as loaded:
            assert digest_of(loaded) == expected, f"{method} into {heap}, warm"
            assert loaded.stats.bytes_from_cache == size - 5, (method, loaded.stats.parts)
            assert {part.source for part in loaded.stats.parts} == {"page-cache"}, method
        drop_cache(path)
        with client.load_file(path, offset=5, heap=heap, method=method) as loaded:
            assert digest_of(loaded) == expected, f"{method} into {heap}, cold"
            assert loaded.stats.bytes_from_cache == 0, (method, loaded.stats.parts)
            if method.startswith("direct-"):
                assert "device" in {part.source for part in loaded.stats.parts}, method
        warm_cache(path)
