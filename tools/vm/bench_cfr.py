#!/usr/bin/env python3
"""Measure loading a file into a dma-buf inside the dmabufd VM: direct copy_file_range vs read().

Run on the host, it boots the patched kernel and runs itself inside:

    python3 tools/vm/bench_cfr.py [--mib 256] [--repeat 3] [--variant patched]

Inside the VM (DMABUFD_IN_VM=1) it writes a file of --mib MiB to the ext4 scratch disk and, with
the page cache dropped before each run, times:

* cfr-direct-heap: copy_file_range from an O_DIRECT fd into a system-heap dma-buf (patched only);
* read-heap-mmap: buffered read() into the mmap'ed heap buffer (DMA_BUF_IOCTL_SYNC bracketed);
* cfr-buffered-heap, cfr-direct-udmabuf (patched only) and odirect-read-memfd (O_DIRECT read()
  into a mapped memfd, the pinning path udmabuf users have on a stock kernel) for context.

Wall time and the process's CPU time (user+sys) are printed per mode, with the ratios against
cfr-direct-heap. A measurement, not a test: software emulation makes absolute numbers meaningless;
compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MiB = 1 << 20
CHUNK = 8 * MiB


def _cpu() -> float:
    """This process's CPU time (user+sys, CLOCK_PROCESS_CPUTIME_ID: scheduler precision)."""
    return time.process_time()


def _write_source(path: Path, size: int) -> str:
    block = hashlib.shake_256(b"dmabufd-bench").digest(MiB)
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for i in range(size // MiB):
            rot = (i * 4099) % MiB
            data = block[rot:] + block[:rot]
            fh.write(data)
            h.update(data)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def guest_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from tests.vm.guest import dmabufd_vm_uapi as u

    patched = os.environ.get("DMABUFD_VM_PATCHED") == "1"
    scratch = Path(os.environ.get("DMABUFD_VM_SCRATCH", "/mnt/scratch"))
    size = args.mib * MiB
    src = scratch / "bench-source.bin"
    print(f"writing {args.mib} MiB source file to {src} ...", flush=True)
    want = _write_source(src, size)

    def heap_target() -> tuple[int, Callable[[], None]]:
        fd = u.alloc_system(size)
        return fd, lambda: os.close(fd)

    def udmabuf_target() -> tuple[int, Callable[[], None]]:
        memfd = u.sealed_memfd(size)
        stack = contextlib.ExitStack()
        stack.enter_context(u.udmabuf_size_limit_at_least(args.mib))
        dev = os.open(u.UDMABUF_DEV, os.O_RDWR)
        fd = u.udmabuf_create(dev, memfd, 0, size)
        os.close(dev)

        def close() -> None:
            os.close(fd)
            os.close(memfd)
            stack.close()

        return fd, close

    def digest(fd: int) -> str:
        h = hashlib.sha256()
        with u.map_buf(fd, size, write=False) as mm, u.cpu_access(fd, u.DMA_BUF_SYNC_READ):
            view = memoryview(mm)
            for off in range(0, size, CHUNK):
                h.update(view[off : off + CHUNK])
            view.release()
        return h.hexdigest()

    def cfr(flags: int, target: Callable[[], tuple[int, Callable[[], None]]]) -> Callable[[], tuple[float, float, str]]:
        def go() -> tuple[float, float, str]:
            dst, close = target()
            sfd = os.open(src, os.O_RDONLY | flags)
            try:
                u.drop_caches()
                t0, c0 = time.perf_counter(), _cpu()
                u.copy_range_all(sfd, 0, dst, 0, size)
                t1, c1 = time.perf_counter(), _cpu()
                return t1 - t0, c1 - c0, digest(dst)
            finally:
                os.close(sfd)
                close()

        return go

    def read_into_heap() -> tuple[float, float, str]:
        dst, close = heap_target()
        sfd = os.open(src, os.O_RDONLY)
        try:
            with u.map_buf(dst, size) as mm:
                u.drop_caches()
                t0, c0 = time.perf_counter(), _cpu()
                with u.cpu_access(dst, u.DMA_BUF_SYNC_WRITE):
                    view = memoryview(mm)
                    off = 0
                    while off < size:
                        n = os.readv(sfd, [view[off : off + CHUNK]])
                        if n <= 0:
                            raise OSError("short file")
                        off += n
                    view.release()
                t1, c1 = time.perf_counter(), _cpu()
            return t1 - t0, c1 - c0, digest(dst)
        finally:
            os.close(sfd)
            close()

    def odirect_read_memfd() -> tuple[float, float, str]:
        memfd = u.sealed_memfd(size)
        sfd = os.open(src, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(memfd, size, mmap.MAP_SHARED) as mm:
                u.drop_caches()
                t0, c0 = time.perf_counter(), _cpu()
                view = memoryview(mm)
                off = 0
                while off < size:
                    n = os.preadv(sfd, [view[off : off + CHUNK]], off)
                    if n <= 0:
                        raise OSError("short file")
                    off += n
                view.release()
                t1, c1 = time.perf_counter(), _cpu()
                h = hashlib.sha256(mm).hexdigest()
            return t1 - t0, c1 - c0, h
        finally:
            os.close(sfd)
            os.close(memfd)

    modes: dict[str, Callable[[], tuple[float, float, str]]] = {}
    if patched:
        modes["cfr-direct-heap"] = cfr(os.O_DIRECT, heap_target)
    modes["read-heap-mmap"] = read_into_heap
    if patched:
        modes["cfr-buffered-heap"] = cfr(0, heap_target)
        modes["cfr-direct-udmabuf"] = cfr(os.O_DIRECT, udmabuf_target)
    modes["odirect-read-memfd"] = odirect_read_memfd

    results: dict[str, dict[str, float]] = {}
    for name, fn in modes.items():
        walls, cpus = [], []
        for i in range(args.repeat):
            wall, cpu, got = fn()
            if got != want:
                print(f"{name}: CONTENT MISMATCH on run {i}", flush=True)
                return 1
            walls.append(wall)
            cpus.append(cpu)
            print(f"  {name} run {i}: wall {wall:.3f} s, cpu {cpu:.3f} s", flush=True)
        results[name] = {
            "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus),
            "mib_per_s": args.mib / statistics.median(walls),
        }
    ref = results.get("cfr-direct-heap")
    print(
        f"\n{args.mib} MiB file, median of {args.repeat}, kernel "
        f"{os.uname().release} ({os.environ.get('DMABUFD_VM_VARIANT')}):"
    )
    print(f"{'mode':22} {'wall s':>8} {'cpu s':>8} {'MiB/s':>8} {'wall x':>7} {'cpu x':>7}")
    cpu_floor = 0.001  # below a millisecond a CPU ratio means nothing

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b >= cpu_floor else "-"

    for name, r in results.items():
        wx = ratio(r["wall_s"], ref["wall_s"]) if ref else "-"
        cx = ratio(r["cpu_s"], ref["cpu_s"]) if ref else "-"
        print(f"{name:22} {r['wall_s']:8.3f} {r['cpu_s']:8.3f} {r['mib_per_s']:8.1f} {wx:>7} {cx:>7}")
    if ref:
        b = results["read-heap-mmap"]
        print(
            f"\nbuffered read() into the mapped heap buffer vs direct copy_file_range: wall "
            f"{b['wall_s']:.3f} s vs {ref['wall_s']:.3f} s ({ratio(b['wall_s'], ref['wall_s'])}x), "
            f"cpu {b['cpu_s']:.3f} s vs {ref['cpu_s']:.3f} s "
            f"({ratio(b['cpu_s'], ref['cpu_s']) if ref['cpu_s'] >= cpu_floor else 'direct: <1 ms'})"
        )
    results_dir = os.environ.get("DMABUFD_VM_RESULTS")
    if results_dir:
        Path(results_dir, "bench_cfr.json").write_text(json.dumps(results, indent=1) + "\n")
    src.unlink()
    return 0


def host_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from tools.vm import dmabufd_vm

    cmd = [sys.executable, str(Path(__file__).resolve()), "--mib", str(args.mib), "--repeat", str(args.repeat)]
    result = dmabufd_vm.run(
        args.variant,
        cmd,
        mem=args.mem,
        disk_mb=args.mib * 2 + 512,
        timeout=args.timeout,
        cwd=REPO,
        console=None if args.quiet else sys.stderr,
    )
    if args.quiet:
        sys.stdout.write(result.output)
    return int(result.returncode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variant", default="patched", help="stock, patched, debug or a custom variant")
    p.add_argument("--mem", default="2G")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("DMABUFD_IN_VM") == "1":
        return guest_main(args)
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
