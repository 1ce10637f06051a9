"""Cheap host-side checks of the VM harness logic (no QEMU, no kernel build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.vm import dmabufd_vm as vm

FRAGMENT = b"CONFIG_64BIT=y\nCONFIG_DMABUF_HEAPS=y\n# CONFIG_FOO is not set\n"
DEBUG = b"CONFIG_PROVE_LOCKING=y\nCONFIG_KASAN=y\n"
PATCHES = [("0001-vfs.patch", b"diff a"), ("0002-dma-buf.patch", b"diff b")]
STOCK = vm.BUILTIN_VARIANTS["stock"]
PATCHED = vm.BUILTIN_VARIANTS["patched"]
DEBUG_VARIANT = vm.BUILTIN_VARIANTS["debug"]


# ---- keys


def test_key_depends_on_every_input() -> None:
    base = vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES)
    assert base == vm.compute_key("patched", "6.12.117-1", FRAGMENT, list(PATCHES))
    assert base != vm.compute_key("patched", "6.12.118-1", FRAGMENT, PATCHES)
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT + b"CONFIG_X=y\n", PATCHES)
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, [PATCHES[0], ("0002-dma-buf.patch", b"diff c")])
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES[:1])
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, [("0001-other.patch", b"diff a"), PATCHES[1]])
    assert base != vm.compute_key("debug", "6.12.117-1", FRAGMENT, PATCHES)
    assert base != vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES, [DEBUG])
    with_extra = vm.compute_key("debug", "6.12.117-1", FRAGMENT, PATCHES, [DEBUG])
    assert with_extra != vm.compute_key("debug", "6.12.117-1", FRAGMENT, PATCHES, [DEBUG + b"CONFIG_Y=y\n"])
    assert with_extra != vm.compute_key("debug", "6.12.117-1", FRAGMENT, PATCHES, [DEBUG, b"CONFIG_DEBUG_LOCKDEP=y\n"])


def test_keys_of_variants_before_variants_existed_are_unchanged() -> None:
    # The values the harness (before variants) computed for these inputs: cached stock/patched kernels
    # must stay valid when the harness learns about more variants.
    assert vm.compute_key("stock", "6.12.117-1", FRAGMENT, []) == "0c3a9c33d18aa8ff8691"
    assert vm.compute_key("patched", "6.12.117-1", FRAGMENT, PATCHES) == "d48513244402b92c887f"


@pytest.fixture
def inputs(tmp_path: Path) -> vm.Inputs:
    frag = tmp_path / "frag.config"
    frag.write_bytes(FRAGMENT)
    pdir = tmp_path / "linux-6.12"
    pdir.mkdir()
    (pdir / "0000-cover-letter.patch").write_text("cover")
    (pdir / "0001-a.patch").write_text("a")
    (pdir / "0002-b.patch").write_text("b")
    (pdir / "README.md").write_text("readme")
    return vm.Inputs("6.12.117-1", tmp_path / "src.tar.xz", frag, tuple(vm.list_patches(pdir)))


def _debug_variant(tmp_path: Path) -> vm.Variant:
    frag = tmp_path / "debug.config"
    if not frag.exists():
        frag.write_bytes(DEBUG)
    return vm.Variant("debug", patched=True, extra_fragments=(frag,), kernel_args="kasan_multi_shot")


def test_key_for_reads_files(tmp_path: Path, inputs: vm.Inputs) -> None:
    assert [p.name for p in inputs.patches] == ["0001-a.patch", "0002-b.patch"]
    pdir = inputs.patches[0].parent
    k1 = vm.key_for(PATCHED, inputs)
    (pdir / "0000-cover-letter.patch").write_text("cover v2")  # not part of the kernel
    assert vm.key_for(PATCHED, inputs) == k1
    s1 = vm.key_for(STOCK, inputs)
    (pdir / "0002-b.patch").write_text("b v2")
    k2 = vm.key_for(PATCHED, inputs)
    assert k2 != k1, "the patched key changes with the patches"
    assert vm.key_for(STOCK, inputs) == s1, "the stock key does not"
    inputs.fragment.write_bytes(FRAGMENT + b"CONFIG_FB=y\n")
    assert vm.key_for(STOCK, inputs) != s1
    assert vm.key_for(PATCHED, inputs) != k2
    assert vm.list_patches(tmp_path / "missing") == []


def test_debug_and_custom_variants_never_change_the_default_keys(tmp_path: Path, inputs: vm.Inputs) -> None:
    stock, patched = vm.key_for(STOCK, inputs), vm.key_for(PATCHED, inputs)
    debug = _debug_variant(tmp_path)
    d1 = vm.key_for(debug, inputs)
    assert d1 not in (stock, patched)
    (tmp_path / "debug.config").write_bytes(DEBUG + b"CONFIG_DEBUG_LOCKDEP=y\n")
    d2 = vm.key_for(debug, inputs)
    assert d2 != d1, "the debug key follows its fragment"
    other_frag = tmp_path / "other-base.config"
    other_frag.write_bytes(b"CONFIG_64BIT=y\n")
    other_series = tmp_path / "v2"
    other_series.mkdir()
    (other_series / "0001-v2.patch").write_text("v2")
    customs = [
        vm.Variant("mine", patched=True, extra_fragments=(tmp_path / "debug.config",)),
        vm.Variant("mine-base", patched=False, fragment=other_frag),
        vm.Variant("v2", patched=True, patch_dir=other_series),
    ]
    keys = {vm.key_for(v, inputs) for v in customs}
    assert len(keys) == 3
    assert not keys & {stock, patched, d2}
    assert (vm.key_for(STOCK, inputs), vm.key_for(PATCHED, inputs)) == (stock, patched)
    # the patched variants' key follows the series, the stock-based one does not
    (inputs.patches[0].parent / "0001-a.patch").write_text("a v2")
    assert vm.key_for(debug, inputs) != d2
    assert vm.key_for(customs[1], inputs) == vm.key_for(customs[1], inputs)
    mine_base = vm.key_for(customs[1], inputs)
    (inputs.patches[0].parent / "0001-a.patch").write_text("a v3")
    assert vm.key_for(customs[1], inputs) == mine_base
    assert vm.key_for(customs[2], inputs) == vm.key_for(customs[2], inputs)


def test_spec_orders_fragments_and_picks_the_series(tmp_path: Path, inputs: vm.Inputs) -> None:
    debug = _debug_variant(tmp_path)
    spec = vm.spec_for(debug, inputs)
    assert spec.fragments == (inputs.fragment, tmp_path / "debug.config")
    assert spec.patches == inputs.patches
    assert spec.fragment_text().index("CONFIG_DMABUF_HEAPS") < spec.fragment_text().index("CONFIG_KASAN")
    assert vm.spec_for(STOCK, inputs).patches == ()
    missing = vm.Variant("broken", patched=True, extra_fragments=(tmp_path / "nope.config",))
    with pytest.raises(vm.VMError, match=r"nope\.config"):
        vm.spec_for(missing, inputs)


def test_builtin_variants() -> None:
    assert vm.VARIANTS == ("stock", "patched", "debug")
    assert not STOCK.patched
    assert PATCHED.patched
    assert DEBUG_VARIANT.patched
    assert DEBUG_VARIANT.extra_fragments == (vm.debug_fragment(),)
    assert "kasan_multi_shot" in DEBUG_VARIANT.kernel_args
    assert all(v.builtin for v in vm.BUILTIN_VARIANTS.values())
    assert not vm.Variant("mine", patched=True).builtin
    with pytest.raises(vm.VMError):
        vm.Variant("../escape", patched=True)


def test_custom_variants_are_remembered(tmp_path: Path) -> None:
    cache = vm.Cache(tmp_path / "cache")
    v = vm.Variant(
        "v2-debug",
        patched=True,
        extra_fragments=(tmp_path / "a.config", tmp_path / "b.config"),
        patch_dir=tmp_path / "v2",
        kernel_args="kasan_multi_shot",
    )
    assert vm.Variant.from_json(v.to_json()) == v
    cache.save_variant(v)
    assert cache.custom_variants() == {"v2-debug": v}
    assert vm.get_variant("v2-debug", cache) == v
    assert vm.get_variant("debug", cache) is DEBUG_VARIANT
    with pytest.raises(vm.VMError, match="unknown variant"):
        vm.get_variant("nope", cache)


# ---- building: a variant's tree never touches another's


def test_a_variant_is_a_copy_of_the_stock_tree_plus_its_series(tmp_path: Path, inputs: vm.Inputs) -> None:
    if shutil.which("patch") is None:
        pytest.skip("patch(1) not installed")
    cache = vm.Cache(tmp_path / "cache")
    stock_tree = cache.tree("stock")
    (stock_tree / "drivers").mkdir(parents=True)
    (stock_tree / "drivers" / "dma-buf.c").write_text("int x;\n")
    (stock_tree / "built.o").write_text("object")
    pdir = tmp_path / "series"
    pdir.mkdir()
    (pdir / "0001-x.patch").write_text(
        "--- a/drivers/dma-buf.c\n+++ b/drivers/dma-buf.c\n@@ -1 +1 @@\n-int x;\n+int y;\n"
    )
    variant = vm.Variant("mine", patched=True, patch_dir=pdir)
    spec = vm.spec_for(variant, inputs)
    log = tmp_path / "build.log"
    with open(tmp_path / "say.log", "w") as say:
        vm._Builder(cache, inputs, spec, say, 1).copy_from_stock(log)
    assert (cache.tree("mine") / "drivers" / "dma-buf.c").read_text() == "int y;\n"
    assert (cache.tree("mine") / "built.o").read_text() == "object", "the stock objects come along"
    assert (stock_tree / "drivers" / "dma-buf.c").read_text() == "int x;\n", "the stock tree is only read"
    assert sorted(p.name for p in cache.trees.iterdir()) == ["mine", "stock"]


def test_cli_keeps_fragment_and_series_options_to_custom_variants(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--fragment", "x.config", "build", "--variant", "stock", "--no-install"],
        ["--patch-dir", "v2", "build", "--all", "--no-install"],
        ["build", "--variant", "patched", "--extra-fragment", "x.config", "--no-install"],
        ["build", "--variant", "stock", "--no-patches", "--no-install"],
    ):
        assert vm.main(argv) == 3, argv
        assert "--name" in capsys.readouterr().err
    assert vm.main(["build", "--name", "stock", "--no-install"]) == 3
    assert "built-in" in capsys.readouterr().err


# ---- Kconfig fragments


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


def test_a_later_fragment_wins() -> None:
    merged = "CONFIG_SLUB_TINY=y\n" + "\n" + "# CONFIG_SLUB_TINY is not set\n"
    assert vm.verify_fragment(merged, "# CONFIG_SLUB_TINY is not set\n") == []


def test_the_real_fragments_parse() -> None:
    frag, debug = vm.default_fragment(), vm.debug_fragment()
    if not frag.is_file() or not debug.is_file():
        pytest.skip("fragments missing")
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
    dbg = vm.parse_config(debug.read_text())
    for name in ("CONFIG_DEBUG_KERNEL", "CONFIG_PROVE_LOCKING", "CONFIG_KASAN", "CONFIG_KASAN_GENERIC", "CONFIG_BUG"):
        assert dbg.get(name) == "y", name
    assert dbg.get("CONFIG_SLUB_TINY") == "n"
    assert dbg.get("CONFIG_DEBUG_LOCKDEP") == "n", "off by default (a custom variant turns it on)"
    # the debug kernel is the product's kernel plus checks: it overrides none of the base
    clashes = {k: (opts[k], v) for k, v in dbg.items() if k in opts and opts[k] != v}
    assert clashes == {}


def test_every_debug_option_says_why() -> None:
    debug = vm.debug_fragment()
    if not debug.is_file():
        pytest.skip("debug fragment missing")
    lines = debug.read_text().splitlines()
    for i, line in enumerate(lines):
        if vm.parse_config(line) and not line.startswith("# CONFIG_"):
            above = lines[i - 1]
            assert above.startswith("#") or vm.parse_config(above), f"no comment above {line!r}"


def test_cache_dir_from_env(tmp_path: Path) -> None:
    assert vm.default_cache_dir({"DMABUFD_VM_CACHE": str(tmp_path)}) == tmp_path
    assert vm.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "dmabufd-vm"
    assert vm.default_cache_dir({}).name == "dmabufd-vm"


# ---- disks


def test_disk_specs() -> None:
    assert vm.DiskSpec.parse("f2fs:1024") == vm.DiskSpec("f2fs", 1024, "f2fs")
    assert vm.DiskSpec.parse("ext4:256:data") == vm.DiskSpec("ext4", 256, "data")
    assert vm.DiskSpec.parse("none:16:blob") == vm.DiskSpec("raw", 16, "blob")
    assert vm.DiskSpec.parse("raw:16").mountpoint is None
    assert vm.DiskSpec.parse("f2fs:1024").mountpoint == "/mnt/f2fs"
    assert vm.DiskSpec.parse("ext4:256:data").env_var == "DMABUFD_VM_DISK_DATA"
    for bad in ("f2fs", "xfs:100", "f2fs:big", "f2fs:16", "ext4:64:Bad-Name", "ext4:64:results", "a:1:b:c"):
        with pytest.raises(vm.VMError):
            vm.DiskSpec.parse(bad)
    with pytest.raises(vm.VMError, match="two disks"):
        vm.run_disks(512, [vm.DiskSpec("ext4", 64, "scratch")])


def test_disk_env_names_the_first_ext4_and_f2fs() -> None:
    disks = vm.run_disks(
        512,
        [vm.DiskSpec("f2fs", 1024, "f2fs"), vm.DiskSpec("ext4", 64, "more"), vm.DiskSpec("raw", 8, "blob")],
    )
    assert [d.name for d in disks] == ["scratch", "f2fs", "more", "blob"]
    env = vm.disk_env(disks)
    assert env == {
        "DMABUFD_VM_DISK_SCRATCH": "/mnt/scratch",
        "DMABUFD_VM_SCRATCH": "/mnt/scratch",
        "DMABUFD_VM_DISK_F2FS": "/mnt/f2fs",
        "DMABUFD_VM_F2FS": "/mnt/f2fs",
        "DMABUFD_VM_DISK_MORE": "/mnt/more",
    }


def test_disk_images_are_made_on_the_host(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    vm.make_disk_image(raw, vm.DiskSpec("raw", 4, "blob"))
    assert raw.stat().st_size == 4 << 20
    for fs, tool in (("ext4", "mkfs.ext4"), ("f2fs", "mkfs.f2fs")):
        if shutil.which(tool) is None and not Path("/sbin", tool).exists():
            continue
        image = tmp_path / f"{fs}.img"
        vm.make_disk_image(image, vm.DiskSpec("ext4" if fs == "ext4" else "f2fs", 64, "d"))
        probe = subprocess.run(["file", "-b", str(image)], check=False, capture_output=True, text=True)
        if probe.returncode == 0:
            assert ("ext4" if fs == "ext4" else "F2FS") in probe.stdout, probe.stdout


# ---- guest init and env


def _target(tmp_path: Path, patched: bool = False) -> vm.BootTarget:
    art = tmp_path / "stock-k1"
    return vm.BootTarget("stock", art / "bzImage", "k1", patched, "", art / "selftests")


def test_init_script_and_guest_env(tmp_path: Path) -> None:
    disks = vm.run_disks(1024, [])
    env = vm.guest_env(
        _target(tmp_path),
        None,
        disks,
        {"EXTRA": "a b"},
        env={"PATH": "/usr/bin", "DMABUFD_X": "1", "SECRET": "no", "DMABUFD_VM_CACHE": "/x", "DMABUFD_VM_DISK_Q": "/q"},
    )
    assert env["DMABUFD_IN_VM"] == "1"
    assert env["DMABUFD_VM_VARIANT"] == "stock"
    assert env["DMABUFD_VM_PATCHED"] == "0"
    assert env["DMABUFD_VM_SCRATCH"] == "/mnt/scratch"
    assert env["DMABUFD_VM_SELFTESTS"] == str(tmp_path / "stock-k1" / "selftests")
    assert env["DMABUFD_X"] == "1"
    assert env["EXTRA"] == "a b"
    assert "SECRET" not in env
    assert "DMABUFD_VM_CACHE" not in env
    assert "DMABUFD_VM_DISK_Q" not in env
    assert "DMABUFD_VM_F2FS" not in env
    assert "DMABUFD_VM_PATCHED_SELFTESTS" not in env
    script = vm.render_init(["python3", "-c", "print('hi there')"], Path("/some dir"), env, disks)
    assert script.startswith("#!/bin/sh\n")
    assert "'EXTRA=a b'" in script
    assert "python3 -c 'print('\"'\"'hi there'\"'\"')'" in script
    assert "cd '/some dir'" in script
    assert vm.INIT_MARKER in script
    assert vm.READY_MARKER in script
    assert "/mnt/results/rc" in script
    assert "dmesg > /mnt/results/dmesg" in script
    assert "/proc/lockdep_stats" in script
    # the kernel log is saved after the disks are unmounted (their unmount is checked too)
    assert script.index("umount /mnt/scratch") < script.index("dmesg > /mnt/results/dmesg")


def test_init_mounts_each_disk(tmp_path: Path) -> None:
    disks = vm.run_disks(
        1024,
        [vm.DiskSpec("f2fs", 1024, "f2fs"), vm.DiskSpec("raw", 8, "blob"), vm.DiskSpec("ext4", 64, "more")],
    )
    env = vm.guest_env(_target(tmp_path, patched=True), None, disks, {}, env={})
    assert env["DMABUFD_VM_PATCHED"] == "1"
    assert env["DMABUFD_VM_F2FS"] == "/mnt/f2fs"
    script = vm.render_init(["true"], tmp_path, env, disks)
    lines = script.splitlines()
    assert "disk_0=$(disk_dev scratch vda)" in lines
    assert "disk_1=$(disk_dev f2fs vdb)" in lines
    assert "disk_2=$(disk_dev blob vdc)" in lines
    assert "disk_3=$(disk_dev more vdd)" in lines
    mounts = [ln for ln in lines if ln.startswith("mount -t ") and "disk_" in ln]
    assert mounts == [
        'mount -t ext4 -o noatime "$disk_0" /mnt/scratch && chmod 1777 /mnt/scratch || setup=disk-scratch',
        'mount -t f2fs -o noatime "$disk_1" /mnt/f2fs && chmod 1777 /mnt/f2fs || setup=disk-f2fs',
        'mount -t ext4 -o noatime "$disk_3" /mnt/more && chmod 1777 /mnt/more || setup=disk-more',
    ]
    assert '"DMABUFD_VM_DISK_BLOB=$disk_2"' in script, "a raw disk's device is passed as found"
    assert " DMABUFD_VM_F2FS=/mnt/f2fs " in script


def test_qemu_command_shape(tmp_path: Path) -> None:
    drives = [(tmp_path / "scratch.img", "scratch"), (tmp_path / "f2fs.img", "f2fs"), (tmp_path / "b.img", "blob")]
    argv = vm.qemu_command(
        tmp_path / "bzImage",
        tmp_path / "init.sh",
        tmp_path / "res",
        drives,
        workdir=tmp_path / "repo",
        mem="2G",
        smp=2,
        accel="tcg",
        cache_mode="none",
        kernel_args="kasan_multi_shot",
    )
    joined = " ".join(argv)
    assert f"id=workdir,path={tmp_path / 'repo'}" in joined, "the checkout is shared wherever it is"
    assert "-no-reboot" in argv
    assert "-nographic" in argv
    assert argv[argv.index("-smp") + 1] == "2"
    assert "panic=-1" in joined
    assert "log_buf_len=4M" in joined
    assert "printk.devkmsg=on" in joined
    assert "rcupdate.rcu_cpu_stall_timeout=120" in joined
    assert "acpi=noirq" in joined
    assert joined.index("vivid.n_devs=2") < joined.index("kasan_multi_shot")
    assert f"init={tmp_path / 'init.sh'}" in joined
    assert "readonly=on" in joined
    assert "mount_tag=hostroot" in joined
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "vivid.n_devs=2 vivid.multiplanar=1,2" in joined
    drive_args = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drive_args == [
        f"file={tmp_path / 'scratch.img'},if=none,id=drive0,format=raw,cache=none",
        f"file={tmp_path / 'f2fs.img'},if=none,id=drive1,format=raw,cache=none",
        f"file={tmp_path / 'b.img'},if=none,id=drive2,format=raw,cache=none",
    ]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]]
    assert devices == [
        "virtio-blk-pci,drive=drive0,serial=scratch",
        "virtio-blk-pci,drive=drive1,serial=f2fs",
        "virtio-blk-pci,drive=drive2,serial=blob",
    ]
    # each -device follows its own -drive
    assert argv.index(devices[0]) < argv.index(drive_args[1])


def test_a_given_kernel_is_described_by_its_build_json(tmp_path: Path) -> None:
    kept = tmp_path / "keep" / "debug-v1"
    (kept / "selftests").mkdir(parents=True)
    (kept / "bzImage").write_bytes(b"kernel")
    (kept / "build.json").write_text('{"variant": "debug", "key": "k9", "patched": true, "kernel_args": "x=1"}')
    cache = vm.Cache(tmp_path / "cache")
    target = vm._resolve_target(
        None,
        kernel=kept / "bzImage",
        selftests=None,
        cache=cache,
        inputs=None,
        build_if_missing=False,
        log=sys.stderr,
    )
    assert target == vm.BootTarget("debug", kept / "bzImage", "k9", True, "x=1", kept / "selftests")
    bare = tmp_path / "bzImage"
    bare.write_bytes(b"kernel")
    target = vm._resolve_target(
        "stock",
        kernel=bare,
        selftests=tmp_path / "st",
        cache=cache,
        inputs=None,
        build_if_missing=False,
        log=sys.stderr,
    )
    assert (target.name, target.patched, target.selftests) == ("stock", False, tmp_path / "st")


# ---- kernel reports

LOCKDEP_CIRCULAR = """\
[   41.120301] dmabufd-vm: test start tests/vm/guest/test_guest_copy_file_range.py::test_load[heap-4096]
[   41.907112]
[   41.907188] ======================================================
[   41.907254] WARNING: possible circular locking dependency detected
[   41.907320] 6.12.118 #1 Not tainted
[   41.907380] ------------------------------------------------------
[   41.907441] python3/812 is trying to acquire lock:
[   41.907503] ffff88800a1c2f48 (&sb->s_type->i_mutex_key#9){++++}-{4:4}, at: ext4_dio_read_iter+0x7e/0x1f0
[   41.907601]
[   41.907601] but task is already holding lock:
[   41.907660] ffff88800b3e1a10 (&buffer->lock){+.+.}-{4:4}, at: system_heap_file_io+0x4c/0x2a0
[   41.907760]
[   41.907760] which lock already depends on the new lock.
[   41.907838] the existing dependency chain (in reverse order) is:
[   41.920001] dmabufd-vm: test end tests/vm/guest/test_guest_copy_file_range.py::test_load[heap-4096]
"""

KASAN_UAF = """\
[   88.000001] dmabufd-vm: test start tests/vm/guest/test_guest_udmabuf.py::test_list
[   88.100000] ==================================================================
[   88.100100] BUG: KASAN: slab-use-after-free in udmabuf_file_io+0x1a4/0x3c0
[   88.100200] Read of size 8 at addr ffff88800c21e008 by task python3/901
[   88.100300]
[   88.100400] CPU: 1 UID: 0 PID: 901 Comm: python3 Not tainted 6.12.118 #1
[   88.100500] Call Trace:
[   88.100600]  <TASK>
[   88.100700]  dump_stack_lvl+0x5d/0x80
[   88.100800]  kasan_report+0xb9/0xf0
[   88.100900]  udmabuf_file_io+0x1a4/0x3c0
[   88.101000] ==================================================================
[   88.101100] udmabuf: some ordinary message after the report
"""

WARN_AND_OOPS = """\
[    5.000000] ------------[ cut here ]------------
[    5.000100] WARNING: CPU: 0 PID: 1 at drivers/dma-buf/dma-buf.c:1234 dma_buf_file_io_bvec+0x99/0x120
[    5.000200] Modules linked in:
[    5.000300] ---[ end trace 0000000000000000 ]---
[    6.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    6.000100] #PF: supervisor read access in kernel mode
[    6.000200] Oops: Oops: 0000 [#1] SMP KASAN
[    6.000300] CPU: 1 UID: 0 PID: 77 Comm: python3 Not tainted 6.12.118 #1
[    7.000000] Oops: general protection fault, probably for non-canonical address 0xdffffc0000000001: 0000 [#2] SMP
[    8.000000] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:585
[    9.000000] =============================
[    9.000100] WARNING: suspicious RCU usage
[   10.000000] UBSAN: shift-out-of-bounds in drivers/dma-buf/udmabuf.c:100:12
[   11.000000] kernel BUG at mm/slub.c:555!
[   12.000000] WARNING: possible recursive locking detected
[   13.000000] WARNING: inconsistent lock state
[   14.000000] rcu: INFO: rcu_sched self-detected stall on CPU
"""

CLEAN = """\
[    0.000000] Linux version 6.12.118 (root@vm) #1 SMP
[    0.100000] ACPI: Using ACPI (MADT) for SMP configuration information
[    1.000000] Lockdep: would be reported here: 0 warnings
[    2.000000] dmabufd-vm: test start tests/vm/guest/test_x.py::test_BUG: in a name
[    2.100000] EXT4-fs (vda): mounted filesystem with ordered data mode
[    2.200000] F2FS-fs (vdb): Mounted with checkpoint version = 1
[    3.000000] dmabufd-vm: test end tests/vm/guest/test_x.py::test_BUG: in a name
"""


def test_lockdep_report_is_found_and_attributed() -> None:
    (report,) = vm.parse_kernel_reports(LOCKDEP_CIRCULAR)
    assert report.kind == "lockdep"
    assert report.title == "WARNING: possible circular locking dependency detected"
    assert report.during == "tests/vm/guest/test_guest_copy_file_range.py::test_load[heap-4096]"
    assert "system_heap_file_io" in "\n".join(report.lines)
    assert not any(line.startswith("[") for line in report.lines), "timestamps are stripped"
    assert "dmabufd-vm: test end" not in "\n".join(report.lines)


def test_kasan_report_ends_at_its_closing_line() -> None:
    (report,) = vm.parse_kernel_reports(KASAN_UAF)
    assert report.kind == "kasan"
    assert report.title.startswith("BUG: KASAN: slab-use-after-free in udmabuf_file_io")
    assert report.lines[1].startswith("Read of size 8")
    assert report.lines[-1] == "=" * 66
    assert "ordinary message" not in "\n".join(report.lines)
    assert report.during == "tests/vm/guest/test_guest_udmabuf.py::test_list"
    assert "[kasan] (during tests/vm/guest/test_guest_udmabuf.py::test_list)" in report.text()


def test_every_report_kind() -> None:
    reports = vm.parse_kernel_reports(WARN_AND_OOPS)
    assert [r.kind for r in reports] == [
        "warning",
        "bug",  # the NULL dereference; its "Oops:" line right after belongs to it
        "gpf",
        "atomic-sleep",
        "rcu",
        "ubsan",
        "bug",
        "lockdep",
        "lockdep",
        "rcu-stall",
    ]
    assert reports[0].lines[-1].startswith("---[ end trace")
    assert any(line.startswith("Oops: Oops: 0000") for line in reports[1].lines)
    assert all(r.during is None for r in reports)


def test_clean_dmesg_has_no_reports() -> None:
    assert vm.parse_kernel_reports(CLEAN) == []
    assert vm.parse_kernel_reports("") == []
    assert vm.format_reports([]) == "no kernel reports"


def test_reports_from_lines_and_limits() -> None:
    lines = ["BUG: KASAN: double-free in x", *[f"line {i}" for i in range(100)]]
    (report,) = vm.parse_kernel_reports(lines, max_lines=10)
    assert len(report.lines) == 10


def test_kmsg_records() -> None:
    assert vm.kmsg_record_lines(b"4,1234,5678901,-;WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2\n") == [
        "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2"
    ]
    assert vm.kmsg_record_lines(b"6,1,2,c;a\\x0ab\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:01.0\n") == ["a", "b"]
    assert vm.kmsg_record_lines(b"garbage") == []


def test_debug_locks() -> None:
    stats = " lock-classes:                          1234 [max: 8192]\n debug_locks:                             1\n"
    assert vm.parse_debug_locks(stats) == 1
    assert vm.parse_debug_locks(stats.replace("1\n", "0\n")) == 0
    assert vm.parse_debug_locks("") is None


def test_collected_kernel_log(tmp_path: Path) -> None:
    cache = vm.Cache(tmp_path / "cache")
    cache.logs.mkdir(parents=True)
    results = tmp_path / "results"
    results.mkdir()
    console = tmp_path / "console.log"
    console.write_text("BUG: from the console only\n")
    (results / "dmesg").write_text(CLEAN)
    (results / "lockdep_stats").write_text(" debug_locks: 0\n")
    dmesg, reports, debug_locks, saved = vm._collect_kernel_log(results, console, cache, "run-x")
    assert dmesg == CLEAN
    assert saved is not None
    assert saved.read_text() == CLEAN
    assert debug_locks == 0
    assert [r.kind for r in reports] == ["lockdep"], "lockdep turning off is reported even without its splat"
    (results / "dmesg").unlink()
    (results / "lockdep_stats").unlink()
    _, reports, debug_locks, saved = vm._collect_kernel_log(results, console, cache, "run-y")
    assert saved is None
    assert debug_locks is None
    assert [r.title for r in reports] == ["BUG: from the console only"], "no dmesg: the console is read"


def test_run_result_summary_counts_reports(tmp_path: Path) -> None:
    result = vm.RunResult(
        0, "", tmp_path / "c.log", 1.0, 2.0, 3.0, False, "debug", "k", "tcg", reports=vm.parse_kernel_reports(KASAN_UAF)
    )
    assert "1 kernel report(s) (kasan)" in result.summary()
    assert "slab-use-after-free" in result.reports_text()


# ---- boots whose init never starts

# A stand-in for QEMU: each start is counted in COUNTER; the starts listed in STALL print an early
# boot KASAN report (naming the code in WHERE) and hang; the others start init and finish the run.
FAKE_QEMU = """\
import pathlib, sys, time
results, counter, stall, where = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
if stall == "exit":
    sys.exit(3)
if str(n) in stall.split(","):
    print("[    1.870000] BUG: KASAN: wild-memory-access in identify_cpu+0x1c/0x40", flush=True)
    print("[    1.870001] Read of size 8 at addr 0xdead by task swapper/0", flush=True)
    for i in range(50):  # the call trace: the code in WHERE comes after a report's first 40 lines
        print("[    1.875000]  frame_%d+0x0/0x10" % i, flush=True)
    print("[    1.880000] Freed by task 1:", flush=True)
    print("[    1.880001]  " + where, flush=True)
    time.sleep(60)
print("{init}", flush=True)
(results / "output").write_text("guest says hello\\n")
(results / "rc").write_text("0")
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """Point run() at FAKE_QEMU; returns the start counter and the script's [stall, where]."""
    script = tmp_path / "fake_qemu.py"
    script.write_text(FAKE_QEMU.replace("{init}", vm.INIT_MARKER))
    counter = tmp_path / "starts"
    behaviour = ["1", "kfree+0x10/0x80"]

    def qemu_command(bzimage: Path, init: Path, results: Path, drives: object, **kw: object) -> list[str]:
        return [sys.executable, str(script), str(results), str(counter), *behaviour]

    monkeypatch.setattr(vm, "qemu_command", qemu_command)
    monkeypatch.setattr(vm, "make_disk_image", lambda path, disk: path.touch())
    monkeypatch.setattr(vm, "_hidden_in_guest", lambda path: None)  # tmp_path is under the guest's /tmp
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    return counter, behaviour


def _fake_run(tmp_path: Path, **kw: object) -> vm.RunResult:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not a kernel")
    args: dict[str, object] = {"timeout": 60.0, "boot_timeout": 2.0, **kw}
    return vm.run(
        None,
        ["true"],
        kernel=kernel,
        cache=vm.Cache(tmp_path / "cache"),
        console=None,
        console_log=tmp_path / "console.log",
        **args,  # type: ignore[arg-type]
    )


def test_a_boot_stuck_before_init_is_killed_and_booted_again(
    tmp_path: Path, fake_qemu: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    counter, _ = fake_qemu
    result = _fake_run(tmp_path)
    assert counter.read_text() == "2"
    assert result.returncode == 0
    assert not result.timed_out
    assert "guest says hello" in result.output
    assert result.boot_seconds is not None, "the second boot's init started"
    assert result.wall_seconds < 30, "the stuck boot was killed at the boot timeout, not the run's"
    [stalled] = result.stalled_boots
    assert 2.0 <= stalled.waited < 5
    assert [r.kind for r in stalled.reports] == ["kasan"], "the stuck boot's console report is kept"
    assert not stalled.touches_our_code()
    assert result.reports == [], "the stuck boot's report is not the last boot's"
    assert [r.kind for r in result.all_reports()] == ["kasan"]
    assert not result.init_never_started
    assert result.boots == 2
    assert "1 boot(s) killed before init started" in result.summary()
    assert "booting again" in capsys.readouterr().err
    console = (tmp_path / "console.log").read_text()
    assert "wild-memory-access" in console, "the stuck boot's console is kept"
    assert "# boot 2 of up to 2" in console, "both boots are in one console log"


def test_every_boot_stuck_ends_the_run_early_and_says_so(tmp_path: Path, fake_qemu: tuple[Path, list[str]]) -> None:
    counter, behaviour = fake_qemu
    behaviour[:] = ["1,2,3", "dma_heap_buffer_alloc+0x10/0x80"]
    result = _fake_run(tmp_path, boot_attempts=3, boot_timeout=1.0)
    assert counter.read_text() == "3"
    assert result.returncode == 124
    assert not result.timed_out
    assert result.boot_seconds is None
    assert result.wall_seconds < 30
    assert "init never started in 3 boot(s)" in result.output
    assert len(result.stalled_boots) == 3
    assert result.init_never_started
    assert result.reports == []
    assert all(b.touches_our_code() for b in result.stalled_boots), "dma-heap code past line 40 is seen"
    assert "one naming dma-buf code" in result.summary()


def test_the_run_timeout_bounds_every_boot_together(tmp_path: Path, fake_qemu: tuple[Path, list[str]]) -> None:
    counter, _ = fake_qemu
    result = _fake_run(tmp_path, timeout=2.0, boot_timeout=30.0)
    assert counter.read_text() == "1", "no second boot once the run's own time is up"
    assert result.init_never_started, "a boot timed out before init never started it either"
    assert result.timed_out
    assert result.returncode == 124
    assert result.stalled_boots == []
    assert result.wall_seconds < 15


def test_a_qemu_that_exits_before_init_is_not_waited_for(tmp_path: Path, fake_qemu: tuple[Path, list[str]]) -> None:
    counter, behaviour = fake_qemu
    behaviour[0] = "exit"
    result = _fake_run(tmp_path, boot_timeout=30.0)
    assert counter.read_text() == "1", "an exit is not a stall: it is not booted again"
    assert result.returncode == 255
    assert not result.timed_out
    assert "qemu exited 3" in result.output
    assert result.wall_seconds < 15


def test_fail_on_reports_counts_the_boots_killed_before_init(
    tmp_path: Path, fake_qemu: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not a kernel")
    argv = ["--cache", str(tmp_path / "cache"), "run", "--kernel", str(kernel), "--quiet", "--boot-timeout", "2"]
    assert vm.main([*argv, "--", "true"]) == 0, "the second boot passed"
    counter, _ = fake_qemu
    counter.unlink()
    assert vm.main([*argv, "--fail-on-reports", "--", "true"]) == 1, "the first boot's report counts"


def test_boot_attempts_must_be_positive(tmp_path: Path, fake_qemu: tuple[Path, list[str]]) -> None:
    with pytest.raises(vm.VMError, match="at least 1"):
        _fake_run(tmp_path, boot_attempts=0)


# ---- cache housekeeping


def test_prune_keeps_current_kernels(tmp_path: Path, inputs: vm.Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    debug = _debug_variant(tmp_path)
    monkeypatch.setitem(vm.BUILTIN_VARIANTS, "debug", debug)
    cache = vm.Cache(tmp_path / "cache")
    current = [cache.artifact(v.name, vm.key_for(v, inputs)) for v in (STOCK, PATCHED, debug)]
    stale = [cache.artifact("stock", "0123456789abcdef0123"), cache.artifact("debug", "0123456789abcdef0123")]
    mine = vm.Variant("my-v2", patched=False)
    cache.save_variant(mine)
    custom = [cache.artifact("my-v2", vm.key_for(mine, inputs)), cache.artifact("my-v2", "0123456789abcdef0123")]
    cache.tree("my-v2").mkdir(parents=True)
    kept = cache.keep / "debug-v1"
    run_dir = cache.runs / "run-stock-x"
    for d in (*current, *stale, *custom, kept, run_dir):
        d.mkdir(parents=True)
    removed = vm.prune(cache, inputs)
    assert sorted(removed) == sorted([*stale, run_dir])
    assert all(d.is_dir() for d in (*current, *custom, kept))
    removed = vm.prune(cache, inputs, custom=True)
    assert sorted(removed) == sorted([*custom, cache.tree("my-v2"), cache.variants / "my-v2.json"])
    assert all(d.is_dir() for d in (*current, kept))
    assert cache.custom_variants() == {}


def test_cache_under_a_guest_tmpfs_is_detected() -> None:
    assert vm._hidden_in_guest(Path("/tmp/cache/dmabufd-vm")) == "/tmp"
    assert vm._hidden_in_guest(Path("/run/x")) == "/run"
    assert vm._hidden_in_guest(Path("/root/.cache/dmabufd-vm")) is None
    assert vm._hidden_in_guest(Path("/tmpfoo/x")) is None
