"""Quotas, heap access rules, client admission and socket permissions,
all from the TOML config."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import dmabufd_client
from tests.conftest import ROOTLESS_UID, DaemonFactory, run_as_rootless_client


def test_byte_quota(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "8M"\n')
    with daemon.connect() as client:
        first = client.allocate("4M")
        second = client.allocate("4M")
        with pytest.raises(dmabufd_client.ResourceExhausted, match=r"quota of 8 MiB") as caught:
            client.allocate(4096)
        assert caught.value.status is grpc.StatusCode.RESOURCE_EXHAUSTED
        first.close()
        client.allocate("4M").close()  # room again after a release
        second.close()
        assert client.stats().denials == 1


def test_buffer_count_quota(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("[quota.default]\nmax_buffers = 10\n")
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.ResourceExhausted, match="quota of 10 buffers"):
            client.allocate_batch(4096, 11)
        assert client.buffers() == [], "a refused batch allocates nothing"
        held = client.allocate_batch(4096, 10)
        with pytest.raises(dmabufd_client.ResourceExhausted):
            client.allocate(4096)
        for buffer in held:
            buffer.close()


def test_quota_is_per_uid_across_sessions(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(f'[quota.uids.{os.getuid()}]\nmax_bytes = "64K"\n')
    with daemon.connect() as one, daemon.connect() as two:
        kept = one.allocate("48K")
        with pytest.raises(dmabufd_client.ResourceExhausted):
            two.allocate("32K")
        kept.close()
        two.allocate("32K").close()


def test_heap_access_rule_denies(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(f"[heaps.access.memfd]\nuids = [{ROOTLESS_UID}]\n")
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.PermissionDenied, match=r"may not allocate from heap 'memfd'"):
            client.allocate(4096, heap="memfd")
        with pytest.raises(dmabufd_client.PermissionDenied, match="usage 'default'"):
            client.allocate(4096)
        assert not {h.name: h for h in client.heaps()}["memfd"].allowed


def test_usage_route_skips_a_heap_the_client_may_not_use(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "dma_heap").mkdir(parents=True)
    (dev / "dma_heap" / "secure").symlink_to("/dev/null")
    config = (
        f'[discovery]\nsource = "scan"\ndev_root = "{dev}"\n'
        f"[heaps.access.secure]\nuids = [{ROOTLESS_UID}]\n"
        '[usage]\nprotected = ["secure", "memfd"]\n'
    )
    daemon = daemon_factory(config)
    with daemon.connect() as client:
        assert {h.name for h in client.heaps()} == {"secure", "memfd"}
        with client.allocate(4096, usage="protected") as buffer:
            assert buffer.info.heap == "memfd"


def test_heap_that_fails_to_allocate(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """A node that is not a real heap (here /dev/null) fails the call with
    UNAVAILABLE and the daemon's reason; it does not crash anything."""
    dev = tmp_path / "dev"
    (dev / "dma_heap").mkdir(parents=True)
    (dev / "dma_heap" / "broken").symlink_to("/dev/null")
    daemon = daemon_factory(f'[discovery]\nsource = "scan"\ndev_root = "{dev}"\n')
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.Unavailable, match="heap 'broken' failed to allocate"):
            client.allocate(4096, heap="broken")
        assert client.buffers() == []
        assert client.stats().total_bytes == 0


def test_clients_not_on_the_allow_list_are_refused(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(f"[clients]\nallowed_uids = [{ROOTLESS_UID}]\n")
    with pytest.raises(dmabufd_client.PermissionDenied, match=f"uid {os.getuid()} is not allowed"):
        daemon.connect()


def test_a_supplementary_group_on_the_allow_list_admits(daemon_factory: DaemonFactory) -> None:
    """clients.allowed_gids admits a client by a supplementary group it had
    when it connected (SO_PEERGROUPS), and the same uid without it is refused."""
    if os.getuid() != 0:
        pytest.fail("needs root to run a client under another uid with groups of its choosing")
    group = 40001  # no account's group: the client takes it on as root, then drops to its uid
    daemon = daemon_factory(f"[clients]\nallowed_gids = [{group}]\n", public=True)
    admitted = run_as_rootless_client(daemon, "print(c.allocate(4096).size)\n", groups=[group])
    assert admitted.returncode == 0, admitted.stderr
    assert admitted.stdout.split() == ["4096"]
    refused = run_as_rootless_client(daemon, "", groups=[group + 1])
    assert refused.returncode != 0
    assert f"PermissionDenied: uid {ROOTLESS_UID} is not allowed" in refused.stderr, refused.stderr


def test_socket_mode_from_config(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[sockets]\nmode = "0660"\n')
    for name in ("dmabufd.sock", "dmabufd.fd.sock"):
        mode = stat.S_IMODE(os.stat(daemon.runtime_dir / name).st_mode)
        assert mode == 0o660, f"{name}: {oct(mode)}"


def test_non_admin_sees_only_its_own_uid(daemon_factory: DaemonFactory) -> None:
    """An unprivileged client (uid 12345, run with setuid in a child) sees
    only its own sessions in stats; root sees everyone."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client under another uid")
    daemon = daemon_factory(public=True)
    with daemon.connect() as admin:
        admin.allocate(4096).detach()
        result = run_as_rootless_client(
            daemon, "s = c.stats()\nprint(s.all_clients, len(s.clients), s.clients[0].uid)\n"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False", "1", str(ROOTLESS_UID)]
        assert admin.stats().all_clients


def test_unprivileged_client_uses_its_own_uid_for_quota(daemon_factory: DaemonFactory) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client under another uid")
    daemon = daemon_factory(f'[quota.uids.{ROOTLESS_UID}]\nmax_bytes = "4K"\n', public=True)
    result = run_as_rootless_client(
        daemon,
        "c.allocate(4096)\n"
        "try:\n    c.allocate(4096)\nexcept dmabufd_client.ResourceExhausted as e:\n    print('refused', e)\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"refused uid {ROOTLESS_UID} holds 4 KiB")
    with daemon.connect() as root_client:  # root's own quota is untouched
        root_client.allocate("1M").close()


def test_bad_config_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[quota.default]\nmax_bytez = "1G"\n')
    result = subprocess.run(
        [sys.executable, "-m", "dmabufd", "--config", str(config), "--runtime-dir", str(tmp_path / "rt")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown key(s) in [quota.default]: max_bytez" in result.stderr
