from __future__ import annotations

import grp
import os
import tomllib
from pathlib import Path

import pytest

from dmabufd.config import DEFAULT_PROBE_ORDER, load_config, parse_config
from dmabufd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dmabufd.toml"


def parse(text: str) -> object:
    return parse_config(tomllib.loads(text))


def test_defaults() -> None:
    config = load_config(None)
    assert config.heaps.probe_order == DEFAULT_PROBE_ORDER
    assert config.heaps.aliases["cma"][0] == "default_cma_region", "6.17's name is tried first"
    assert config.quota_for(1000) == config.default_quota
    assert config.clients.allowed is None
    assert config.clients.admins.allows(0, frozenset())


def test_the_memfd_reserve_is_off_unless_sizes_are_named() -> None:
    assert load_config(None).heaps.memfd_reserve == ()
    config = parse_config(tomllib.loads('[heaps]\nmemfd_reserve = ["512M", "128M", 4096]'))
    assert config.heaps.memfd_reserve == (512 << 20, 128 << 20, 4096)


def test_shipped_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.sockets.mode == 0o660
    assert config.quota_for(1047).max_bytes < config.default_quota.max_bytes


def test_full_config() -> None:
    root_group = grp.getgrgid(0).gr_name
    config = parse_config(
        tomllib.loads(
            f"""
            [sockets]
            mode = "0660"
            group = "{root_group}"
            [clients]
            allowed_uids = [1000]
            allowed_gids = ["{root_group}"]
            admin_uids = [1001]
            [discovery]
            source = "scan"
            dev_root = "/tmp/dev"
            rescan_interval_s = 0.5
            memfd = false
            [heaps]
            probe_order = ["system", "memfd"]
            max_buffer_bytes = "1G"
            max_batch = 16
            [heaps.aliases]
            fast = ["system-uncached", "system"]
            [heaps.access."linux,cma"]
            uids = [1047]
            gids = [1006]
            [usage]
            npu = ["fast", "memfd"]
            [quota.default]
            max_bytes = "2G"
            max_buffers = 100
            [quota.uids.1047]
            max_bytes = "512M"
            """
        )
    )
    assert config.sockets.group == 0
    assert config.clients.allowed is not None
    assert config.clients.allowed.allows(1000, frozenset())
    assert config.clients.allowed.allows(5, frozenset({0}))
    assert not config.clients.allowed.allows(5, frozenset({5}))
    assert config.clients.admins.allows(1001, frozenset())
    assert config.clients.admins.allows(0, frozenset()), "root is always an admin"
    assert config.discovery.dev_root == Path("/tmp/dev")
    assert not config.discovery.memfd
    assert config.heaps.max_buffer_bytes == 1 << 30
    assert config.heaps.aliases["fast"] == ("system-uncached", "system")
    assert "cma" in config.heaps.aliases, "defaults stay unless overridden"
    assert config.heaps.usage["npu"] == ("fast", "memfd")
    assert config.heaps.access["linux,cma"].allows(7, frozenset({1006}))
    assert config.quota_for(1047).max_bytes == 512 << 20
    assert config.quota_for(1047).max_buffers == 100, "unset fields inherit the default quota"
    assert config.quota_for(1).max_bytes == 2 << 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[quota.default]\nmax_bytez = 1", r"unknown key\(s\) in \[quota.default\]: max_bytez"),
        ("typo = 1", r"unknown key\(s\) in \[top level\]: typo"),
        ('[quota.default]\nmax_bytes = "lots"', "not a size"),
        ("[quota.default]\nmax_buffers = true", "must be a number"),
        ('[discovery]\nsource = "magic"', "discovery.source"),
        ("[discovery]\nrescan_interval_s = 0", "positive"),
        ('[sockets]\nmode = "rw"', "octal"),
        ('[sockets]\ngroup = "no-such-group-here"', "no group named"),
        ("[quota.uids.alice]\nmax_bytes = 1", "numeric uids"),
        ("[heaps]\nprobe_order = [1]", "non-empty strings"),
        ("[heaps]\nmax_batch = 0", "at least 1"),
        ("[clients]\nallowed_uids = [-1]", "not a valid id"),
        ("[heaps.access.system]\nusers = [1]", "unknown key"),
        ('[scheduling]\ncall_cpus = "1-0"', "scheduling.call_cpus: not a CPU list"),
        ('[scheduling]\ncall_cpus = "8191"', "names CPU\\(s\\) 8191, which dmabufd may not run on"),
        ("[scheduling]\ncall_cpus = 1", "must be a string"),
        ("[scheduling]\nloop_nice = -4.5", "scheduling.loop_nice must be a whole number from -20 to 19, not -4.5"),
        ("[scheduling]\nloop_nice = -21", "scheduling.loop_nice must be a whole number from -20 to 19, not -21"),
        ("[scheduling]\nloop_nice = 20", "from -20 to 19, not 20"),
        ("[scheduling]\nloop_nice = nan", "from -20 to 19, not nan"),
        ("[scheduling]\nloop_nice = -inf", "from -20 to 19, not -inf"),
        ('[scheduling]\nloop_nice = "-4"', "scheduling.loop_nice must be a number"),
        (
            "[loading]\npopulate = true",
            r"loading.populate is no longer a setting \(memfd buffers are filled by writing",
        ),
        ("[loading]\nhuge_pages = false", r"loading.huge_pages is no longer a setting .*; delete it"),
        ('[heaps]\nmemfd_reserve = "512M"', "heaps.memfd_reserve must be a list of sizes"),
        ('[heaps]\nmemfd_reserve = ["lots"]', "heaps.memfd_reserve: not a size"),
        ("[heaps]\nmemfd_reserve = [true]", "heaps.memfd_reserve: not a size"),
        ("[heaps]\nmemfd_reserve = [0]", "heaps.memfd_reserve: 0 is not a positive multiple of the page size"),
        ("[heaps]\nmemfd_reserve = [5000]", "heaps.memfd_reserve: 5000 is not a positive multiple of the page size"),
        ('[heaps]\nmax_buffer_bytes = "1M"\nmemfd_reserve = ["2M"]', "more than heaps.max_buffer_bytes"),
        (
            '[heaps]\nmemfd_reserve = ["1M", "1M", "1M", "1M", "1M", "1M", "1M", "1M", "1M", "1M", "1M", "1M", '
            '"1M", "1M", "1M", "1M", "1M"]',
            "names 17 sizes; at most 16",
        ),
        ('[heaps]\nmemfd_reserve = ["1000T"]', "more than half of this machine's memory"),
        ('[heaps]\nmemfd_reserve = ["8M"]\n[discovery]\nmemfd = false', "discovery.memfd = false turns off"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_call_cpus_are_the_ones_named_and_none_by_default() -> None:
    usable = os.sched_getaffinity(0)
    assert load_config(None).scheduling.call_cpus is None, "threads go where the kernel puts them"
    one = max(usable)
    config = parse_config(tomllib.loads(f'[scheduling]\ncall_cpus = "{one}"'))
    assert config.scheduling.call_cpus == frozenset({one})


def test_the_loop_runs_at_android_display_priority_unless_told_otherwise() -> None:
    assert load_config(None).scheduling.loop_nice == -4
    assert parse_config(tomllib.loads("[scheduling]\nloop_nice = 0")).scheduling.loop_nice == 0
    assert parse_config(tomllib.loads("[scheduling]\nloop_nice = -10.0")).scheduling.loop_nice == -10


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[[")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
