"""Which heaps exist now, and when that changes.

Two sources, one result (a {name: HeapSpec} map handed to the registry):

- udev (pyudev): enumerates the `dma_heap` subsystem and the `udmabuf` misc
  device, and listens to kernel uevents (source="kernel": no udevd needed)
  so a heap that appears or goes is seen at once;
- scan: lists <dev_root>/dma_heap/ and <dev_root>/udmabuf, for systems
  without libudev and for tests that point dev_root at a directory of their
  own.

Either way the set is rescanned every rescan_interval_s too, so a missed
uevent costs at most one interval. Events are hints; the scan is the truth.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmabufd.config import DiscoveryConfig
from dmabufd.heaps.backend import BackendKind, HeapSpec
from dmabufd.heaps.memfd import MEMFD_SPEC
from dmabufd.heaps.udmabuf import UDMABUF_HEAP_NAME, read_size_limit

log = logging.getLogger(__name__)

HeapSet = dict[str, HeapSpec]
UDEV_SUBSYSTEMS = ("dma_heap", "misc")


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _udmabuf_spec(node: Path, sys_root: Path) -> HeapSpec:
    return HeapSpec(UDMABUF_HEAP_NAME, BackendKind.UDMABUF, str(node), read_size_limit(sys_root))


def scan_devices(dev_root: Path, sys_root: Path) -> HeapSet:
    """Heaps found by listing device nodes."""
    found: HeapSet = {}
    heap_dir = dev_root / "dma_heap"
    try:
        names = sorted(os.listdir(heap_dir))
    except OSError:
        names = []
    for name in names:
        node = heap_dir / name
        if _is_char_device(node):
            found[name] = HeapSpec(name, BackendKind.DMA_HEAP, str(node))
    udmabuf = dev_root / "udmabuf"
    if _is_char_device(udmabuf):
        found[UDMABUF_HEAP_NAME] = _udmabuf_spec(udmabuf, sys_root)
    return found


def udev_devices(context: Any, sys_root: Path) -> HeapSet:
    """Heaps found by enumerating udev's view of sysfs."""
    found: HeapSet = {}
    for device in context.list_devices(subsystem="dma_heap"):
        if device.device_node and _is_char_device(Path(device.device_node)):
            found[device.sys_name] = HeapSpec(device.sys_name, BackendKind.DMA_HEAP, device.device_node)
    for device in context.list_devices(subsystem="misc", sys_name="udmabuf"):
        if device.device_node and _is_char_device(Path(device.device_node)):
            found[UDMABUF_HEAP_NAME] = _udmabuf_spec(Path(device.device_node), sys_root)
    return found


class HeapDiscovery:
    """Runs one thread that reports the heap set whenever it may have
    changed. `on_change` is called from that thread only, and once from
    start() on the caller's thread before the thread exists."""

    def __init__(self, config: DiscoveryConfig, on_change: Callable[[HeapSet], None]) -> None:
        self._config = config
        self._on_change = on_change
        self._stop = threading.Event()
        # Written to by stop(), so a thread waiting for uevents wakes at once.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._udev_context: Any = None
        self._monitor: Any = None
        self.source = self._choose_source()

    def _choose_source(self) -> str:
        wanted = self._config.source
        if wanted == "scan" or (wanted == "auto" and self._config.dev_root != Path("/dev")):
            return "scan"
        try:
            import pyudev

            self._udev_context = pyudev.Context()
            self._monitor = pyudev.Monitor.from_netlink(self._udev_context, source="kernel")
            for subsystem in UDEV_SUBSYSTEMS:
                self._monitor.filter_by(subsystem)
            self._monitor.start()
        except (ImportError, OSError) as error:
            if wanted == "udev":
                raise
            log.warning(
                "libudev is not usable (%s); falling back to scanning %s and %s every %.1f s",
                error,
                self._config.dev_root,
                self._config.sys_root,
                self._config.rescan_interval_s,
            )
            self._monitor = None
            return "scan"
        return "udev"

    def scan(self) -> HeapSet:
        if self.source == "udev":
            found = udev_devices(self._udev_context, self._config.sys_root)
        else:
            found = scan_devices(self._config.dev_root, self._config.sys_root)
        if self._config.memfd:
            found[MEMFD_SPEC.name] = MEMFD_SPEC
        return found

    def start(self) -> None:
        self._on_change(self.scan())
        self._thread = threading.Thread(target=self._run, name="heap-discovery", daemon=True)
        self._thread.start()
        log.info("heap discovery: %s, rescan every %.1f s", self.source, self._config.rescan_interval_s)

    def _wait_for_change(self) -> None:
        """Return after a uevent, a stop request or one rescan interval."""
        waiting_on = [self._wake_r] if self._monitor is None else [self._wake_r, self._monitor.fileno()]
        ready, _, _ = select.select(waiting_on, [], [], self._config.rescan_interval_s)
        if self._monitor is not None and self._monitor.fileno() in ready:
            # Drain every queued uevent: one rescan covers them all.
            while (device := self._monitor.poll(timeout=0)) is not None:
                log.info("uevent: %s %s (%s)", device.action, device.sys_name, device.subsystem)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wait_for_change()
            if self._stop.is_set():
                break
            try:
                self._on_change(self.scan())
            except Exception:  # keep discovering: one bad scan must not end the thread
                log.exception("heap rescan failed")

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
