"""Heap discovery against real kernel interfaces."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from dmabufd.config import DiscoveryConfig
from dmabufd.heaps.backend import BackendKind
from dmabufd.heaps.discovery import HeapDiscovery, HeapSet, scan_devices


def test_scan_finds_character_devices_only(tmp_path: Path) -> None:
    heaps = tmp_path / "dma_heap"
    heaps.mkdir()
    (heaps / "system").symlink_to("/dev/null")
    (heaps / "not-a-device").write_text("")
    (tmp_path / "udmabuf").symlink_to("/dev/zero")
    sysfs = tmp_path / "sys/module/udmabuf/parameters"
    sysfs.mkdir(parents=True)
    (sysfs / "size_limit_mb").write_text("128\n")
    found = scan_devices(tmp_path, tmp_path / "sys")
    assert set(found) == {"system", "udmabuf"}
    assert found["system"].kind is BackendKind.DMA_HEAP
    assert found["udmabuf"].max_buffer_bytes == 128 << 20


def test_scan_of_this_machine_matches_dev(tmp_path: Path) -> None:
    found = scan_devices(Path("/dev"), Path("/sys"))
    expected = set(os.listdir("/dev/dma_heap")) if os.path.isdir("/dev/dma_heap") else set()
    if os.path.exists("/dev/udmabuf"):
        expected.add("udmabuf")
    assert set(found) == expected


def _misc_device_uevent() -> Path:
    for name in ("fuse", "loop-control", "vga_arbiter", "hw_random", "rfkill", "udmabuf"):
        path = Path("/sys/class/misc") / name / "uevent"
        if path.exists():
            return path
    pytest.skip("no misc device to send a uevent for")


@pytest.mark.skipif(os.geteuid() != 0, reason="writing a uevent file needs root")
def test_a_real_kernel_uevent_triggers_a_rescan() -> None:
    """pyudev end to end: the kernel emits a uevent on its netlink socket,
    the daemon's monitor (source="kernel", no udevd) wakes and rescans long
    before the one-minute rescan interval."""
    pytest.importorskip("pyudev")
    uevent = _misc_device_uevent()
    rescans: list[HeapSet] = []
    rescanned = threading.Event()

    def on_change(found: HeapSet) -> None:
        rescans.append(found)
        if len(rescans) > 1:
            rescanned.set()

    discovery = HeapDiscovery(DiscoveryConfig(source="udev", rescan_interval_s=60.0), on_change)
    assert discovery.source == "udev"
    discovery.start()
    try:
        uevent.write_text("change")
        assert rescanned.wait(10), "the uevent did not wake discovery"
    finally:
        discovery.stop()
    assert "memfd" in rescans[-1]


def test_udev_and_scan_agree_on_this_machine() -> None:
    pytest.importorskip("pyudev")
    seen: list[HeapSet] = []
    udev = HeapDiscovery(DiscoveryConfig(source="udev"), seen.append)
    scan = HeapDiscovery(DiscoveryConfig(source="scan"), seen.append)
    try:
        assert udev.scan() == scan.scan()
    finally:
        udev.stop()
        scan.stop()


def test_without_libudev_auto_falls_back_to_scanning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pyudev", None)  # import pyudev now raises ImportError
    discovery = HeapDiscovery(DiscoveryConfig(source="auto"), lambda found: None)
    try:
        assert discovery.source == "scan"
        assert "libudev is not usable" in caplog.text
        assert "falling back to scanning /dev and /sys" in caplog.text
    finally:
        discovery.stop()


def test_udev_source_required_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyudev", None)
    with pytest.raises(ImportError):
        HeapDiscovery(DiscoveryConfig(source="udev"), lambda found: None)
