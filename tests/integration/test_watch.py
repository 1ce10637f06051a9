"""Heap discovery seen from clients: WatchHeaps streams heaps appearing
and going. The daemon scans a device directory of the test's own (an
injectable event source: the heap is a symlink to /dev/null)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import dmabufd_client
from dmabufd_client import HeapEvent
from tests.conftest import DaemonFactory

EVENT_TIMEOUT_S = 10.0


def collect(client: dmabufd_client.Client, events: queue.Queue[HeapEvent], stop: threading.Event) -> None:
    for event in client.watch_heaps(include_existing=True):
        events.put(event)
        if stop.is_set():
            return


def test_watch_sees_a_heap_appear_and_go(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "dma_heap").mkdir(parents=True)
    daemon = daemon_factory(f'[discovery]\nsource = "scan"\ndev_root = "{dev}"\nrescan_interval_s = 0.2\n')
    events: queue.Queue[HeapEvent] = queue.Queue()
    stop = threading.Event()
    with daemon.connect() as client:
        watcher = threading.Thread(target=collect, args=(client, events, stop), daemon=True)
        watcher.start()
        first = events.get(timeout=EVENT_TIMEOUT_S)
        assert (first.kind, first.heap and first.heap.name) == ("added", "memfd")
        assert events.get(timeout=EVENT_TIMEOUT_S).kind == "synced"

        (dev / "dma_heap" / "hotplug").symlink_to("/dev/null")
        added = events.get(timeout=EVENT_TIMEOUT_S)
        assert added.kind == "added"
        assert added.heap is not None
        assert added.heap.name == "hotplug"
        assert added.heap.device_path == str(dev / "dma_heap" / "hotplug")
        assert "hotplug" in {heap.name for heap in client.heaps()}

        (dev / "dma_heap" / "hotplug").unlink()
        stop.set()
        removed = events.get(timeout=EVENT_TIMEOUT_S)
        assert (removed.kind, removed.heap and removed.heap.name) == ("removed", "hotplug")
        watcher.join(timeout=EVENT_TIMEOUT_S)
        assert not watcher.is_alive()
        assert "hotplug" not in {heap.name for heap in client.heaps()}


def test_watch_stream_ends_when_the_daemon_stops(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    events: queue.Queue[HeapEvent] = queue.Queue()
    finished = threading.Event()
    client = daemon.connect()

    def watch() -> None:
        try:
            for event in client.watch_heaps():
                events.put(event)
        except dmabufd_client.DmabufdError:
            pass
        finally:
            finished.set()

    threading.Thread(target=watch, daemon=True).start()
    assert events.get(timeout=EVENT_TIMEOUT_S).kind == "added"
    daemon.process.terminate()
    assert daemon.process.wait(timeout=15) == 0, "a live watch stream does not block shutdown"
    assert finished.wait(EVENT_TIMEOUT_S)
    client.close()
