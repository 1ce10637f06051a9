"""Cheap host-side checks of the VM harness logic (no QEMU, no kernel build)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.vm import dmabufd_vm as vm

FRAGMENT = b"CONFIG_64BIT=y\nCONFIG_DMABUF_HEAPS=y\n# CONFIG_FOO is not set\n"
PATCHES = [("0001-vfs.patch", b"diff a"), ("0002-dma-buf.patch", b"diff b")]


def test_key_depends_on_every_input() -> None:
    base = vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES)
    assert base == vm.compute_key("patched", "6.12.117-1", FRAGMENT, list(PATCHES))
    assert base != vm.compute_key("patched", "6.12.118-1", FRAGMENT, PATCHES)
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT + b"CONFIG_X=y\n", PATCHES)
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, [PATCHES[0], ("0002-dma-buf.patch", b"diff c")])
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES[:1])
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, [("0001-other.patch", b"diff a"), PATCHES[1]])


def test_stock_key_ignores_patches_and_differs_from_patched() -> None:
    stock = vm.compute_key("stock", "6.12.117-1", FRAGMENT, [])
    assert stock == vm.compute_key("stock", "6.12.117-1", FRAGMENT, PATCHES)
    assert stock != vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES)
    assert stock != vm.compute_key("stock", "6.12.117-1", FRAGMENT + b"\n", [])


def test_key_for_reads_files(tmp_path: Path) -> None:
    frag = tmp_path / "frag.config"
    frag.write_bytes(FRAGMENT)
    pdir = tmp_path / "linux-6.12"
    pdir.mkdir()
    (pdir / "0000-cover-letter.patch").write_text("cover")
    (pdir / "0001-a.patch").write_text("a")
    (pdir / "0002-b.patch").write_text("b")
    (pdir / "README.md").write_text("readme")
    patches = vm.list_patches(pdir)
    assert [p.name for p in patches] == ["0001-a.patch", "0002-b.patch"]
    inputs = vm.Inputs("6.12.117-1", tmp_path / "src.tar.xz", frag, tuple(patches))
    k1 = vm.key_for("patched", inputs)
    (pdir / "0000-cover-letter.patch").write_text("cover v2")  # not part of the kernel
    assert vm.key_for("patched", inputs) == k1
    (pdir / "0002-b.patch").write_text("b v2")
    k2 = vm.key_for("patched", inputs)
    assert k2 != k1
    s1 = vm.key_for("stock", inputs)
    frag.write_bytes(FRAGMENT + b"CONFIG_FB=y\n")
    assert vm.key_for("stock", inputs) != s1
    assert vm.key_for("patched", inputs) != k2
    assert vm.list_patches(tmp_path / "missing") == []


def test_verify_fragment_catches_dropped_option() -> None:
    fragment = "CONFIG_VIDEO_VIVID=y\nCONFIG_CMA_SIZE_MBYTES=64\n# CONFIG_MODULES is not set\n"
    good = "CONFIG_VIDEO_VIVID=y\nCONFIG_CMA_SIZE_MBYTES=64\n# CONFIG_MODULES is not set\n"
    assert vm.verify_fragment(fragment, good) == []
    dropped = "# CONFIG_VIDEO_VIVID is not set\nCONFIG_CMA_SIZE_MBYTES=64\n"
    assert vm.verify_fragment(fragment, dropped) == ["CONFIG_VIDEO_VIVID: wanted y, got not set"]
    absent = "CONFIG_CMA_SIZE_MBYTES=32\nCONFIG_MODULES=y\n"
    problems = vm.verify_fragment(fragment, absent)
    assert "CONFIG_VIDEO_VIVID: wanted y, got not set" in problems
    assert "CONFIG_CMA_SIZE_MBYTES: wanted 64, got 32" in problems
    assert "CONFIG_MODULES: wanted not set, got y" in problems


def test_the_real_fragment_parses() -> None:
    frag = vm.default_fragment()
    if not frag.is_file():
        pytest.skip(f"{frag} missing")
    opts = vm.parse_config(frag.read_text())
    for name in (
        "CONFIG_DMABUF_HEAPS_SYSTEM",
        "CONFIG_UDMABUF",
        "CONFIG_9P_FS",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_EXT4_FS",
        "CONFIG_DEBUG_FS",
    ):
        assert opts.get(name) == "y", name


def test_cache_dir_from_env(tmp_path: Path) -> None:
    assert vm.default_cache_dir({"DMABUFD_VM_CACHE": str(tmp_path)}) == tmp_path
    assert vm.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "dmabufd-vm"
    assert vm.default_cache_dir({}).name == "dmabufd-vm"


def test_init_script_and_guest_env(tmp_path: Path) -> None:
    art = vm.Artifact("stock", "k1", tmp_path / "stock-k1")
    env = vm.guest_env(
        "stock",
        art,
        None,
        {"EXTRA": "a b"},
        env={"PATH": "/usr/bin", "DMABUFD_X": "1", "SECRET": "no", "DMABUFD_VM_CACHE": "/x"},
    )
    assert env["DMABUFD_IN_VM"] == "1"
    assert env["DMABUFD_VM_VARIANT"] == "stock"
    assert env["DMABUFD_VM_SCRATCH"] == "/mnt/scratch"
    assert env["DMABUFD_VM_SELFTESTS"] == str(art.selftests)
    assert env["DMABUFD_X"] == "1"
    assert env["EXTRA"] == "a b"
    assert "SECRET" not in env
    assert "DMABUFD_VM_CACHE" not in env
    assert "DMABUFD_VM_PATCHED_SELFTESTS" not in env
    script = vm.render_init(["python3", "-c", "print('hi there')"], Path("/some dir"), env)
    assert script.startswith("#!/bin/sh\n")
    assert "'EXTRA=a b'" in script
    assert "python3 -c 'print('\"'\"'hi there'\"'\"')'" in script
    assert "cd '/some dir'" in script
    assert vm.INIT_MARKER in script
    assert vm.READY_MARKER in script
    assert "/mnt/results/rc" in script


def test_qemu_command_shape(tmp_path: Path) -> None:
    argv = vm.qemu_command(
        tmp_path / "bzImage",
        tmp_path / "init.sh",
        tmp_path / "res",
        tmp_path / "disk.img",
        workdir=tmp_path / "repo",
        mem="2G",
        smp=2,
        accel="tcg",
        cache_mode="none",
    )
    joined = " ".join(argv)
    assert f"id=workdir,path={tmp_path / 'repo'}" in joined, "the checkout is shared wherever it is"
    assert "-no-reboot" in argv
    assert "-nographic" in argv
    assert "panic=-1" in joined
    assert f"init={tmp_path / 'init.sh'}" in joined
    assert "readonly=on" in joined
    assert "mount_tag=hostroot" in joined
    assert f"file={tmp_path / 'disk.img'},if=virtio,format=raw,cache=none" in joined
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "vivid.n_devs=2 vivid.multiplanar=1,2" in joined


def test_prune_keeps_current_kernels(tmp_path: Path) -> None:
    frag = tmp_path / "frag.config"
    frag.write_bytes(FRAGMENT)
    inputs = vm.Inputs("6.12.117-1", tmp_path / "src.tar.xz", frag, ())
    cache = vm.Cache(tmp_path / "cache")
    current = cache.artifact("stock", vm.key_for("stock", inputs))
    stale = cache.artifact("stock", "0123456789abcdef0123")
    run_dir = cache.runs / "run-stock-x"
    for d in (current, stale, run_dir):
        d.mkdir(parents=True)
    removed = vm.prune(cache, inputs)
    assert sorted(removed) == sorted([stale, run_dir])
    assert current.is_dir()
    assert not stale.exists()


def test_cache_under_a_guest_tmpfs_is_detected() -> None:
    assert vm._hidden_in_guest(Path("/tmp/cache/dmabufd-vm")) == "/tmp"
    assert vm._hidden_in_guest(Path("/run/x")) == "/run"
    assert vm._hidden_in_guest(Path("/root/.cache/dmabufd-vm")) is None
    assert vm._hidden_in_guest(Path("/tmpfoo/x")) is None
