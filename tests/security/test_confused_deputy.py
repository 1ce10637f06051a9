"""Confused deputy: the daemon runs as root and reads files for clients. It
must read only what the client itself could read, through the fd the
client sent or a path opened with the client's own credentials, and only
under the configured roots."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import DaemonFactory
from tests.security.conftest import (
    Spawn,
    VictimOf,
    assert_recovered,
    assert_served,
    attacker_dir,
    footprint,
    safetensors_bytes,
    write_file,
)

# 64 KiB: a whole number of pages, so a daemon doing direct I/O reads all
# of it through its own O_DIRECT reopen of the fd.
SECRET = (b"TOP-SECRET root only " * 3200)[: 64 << 10]


def roots_config(*roots: Path) -> str:
    return "[loading]\nroots = [" + ", ".join(f'"{root}"' for root in roots) + "]\n"


def assert_no_secret(outcomes: list[dict[str, object]]) -> None:
    for outcome in outcomes:
        content = bytes.fromhex(str(outcome["content"]))
        assert b"TOP-SECRET" not in content, f"the attacker received the secret file's bytes: {outcome['status']}"


def test_o_path_fd_of_a_root_only_file(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 opens a root-owned 0600 file with O_PATH (no read
    right needed, only search on the 0755 directory) and sends that fd to
    LoadFile and LoadModel, hoping the daemon reopens it as root.
    Defence: PERMISSION_DENIED for both; no byte of the file reaches it."""
    daemon = daemon_factory(public=True)
    write_file(shared_dir / "secret.bin", SECRET, 0o600)
    write_file(shared_dir / "secret.safetensors", safetensors_bytes({"secret": SECRET}), 0o600)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[
            {"path": str(shared_dir / "secret.bin"), "open_as": "o_path", "api": "file"},
            {"path": str(shared_dir / "secret.safetensors"), "open_as": "o_path", "api": "model"},
        ],
    )
    victim.start()
    attacker.go()
    outcomes = attacker.result()["outcomes"]
    served = victim.stop()
    assert_no_secret(outcomes)
    assert [o["status"] for o in outcomes] == ["PERMISSION_DENIED", "PERMISSION_DENIED"], outcomes
    assert_served(served)
    assert_recovered(daemon, before)


def test_write_only_fd_of_a_file_it_may_not_read(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: a root-owned file of mode 0622 lets uid 12345 write but not
    read; it opens it O_WRONLY and sends that fd to LoadFile and LoadModel.
    Defence: PERMISSION_DENIED for both; no byte of the file reaches it."""
    daemon = daemon_factory(public=True)
    write_file(shared_dir / "dropbox.bin", SECRET, 0o622)
    write_file(shared_dir / "dropbox.safetensors", safetensors_bytes({"secret": SECRET}), 0o622)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[
            {"path": str(shared_dir / "dropbox.bin"), "open_as": "wronly", "api": "file"},
            {"path": str(shared_dir / "dropbox.safetensors"), "open_as": "wronly", "api": "model"},
        ],
    )
    victim.start()
    attacker.go()
    outcomes = attacker.result()["outcomes"]
    served = victim.stop()
    assert_no_secret(outcomes)
    assert [o["status"] for o in outcomes] == ["PERMISSION_DENIED", "PERMISSION_DENIED"], outcomes
    assert_served(served)
    assert_recovered(daemon, before)


def test_fd_opened_before_the_file_was_locked_away(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 opens a 0644 file O_RDONLY; root then makes it 0600
    and puts another root-only file at its path; the attacker loads its fd.
    Defence: holding a read fd is the attacker's right, so the load may
    succeed, but only through that fd: the bytes are the ones its fd
    reads, never the new file's (refusing with PERMISSION_DENIED is also
    acceptable)."""
    daemon = daemon_factory(public=True)
    original = write_file(shared_dir / "weights.bin", os.urandom(64 << 10), 0o644)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("load_after_chmod", runtime_dir=str(daemon.runtime_dir), path=str(shared_dir / "weights.bin"))
    victim.start()
    attacker.go()
    attacker.expect("opened")
    (shared_dir / "weights.bin").chmod(0o600)
    write_file(shared_dir / "replacement.bin", SECRET, 0o600)
    (shared_dir / "replacement.bin").rename(shared_dir / "weights.bin")
    attacker.send("load")
    result = attacker.result()
    served = victim.stop()
    assert not result["path_readable_now"], "the test meant to take the read right away"
    assert_no_secret([result])
    assert result["status"] in ("OK", "PERMISSION_DENIED"), result
    if result["status"] == "OK":
        assert bytes.fromhex(result["content"]) == original, "the load did not read through the client's fd"
    print(f"load through an fd whose file is now 0600: {result['status']}")
    assert_served(served)
    assert_recovered(daemon, before)


def test_symlink_out_of_the_loading_root(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: inside a loading root, symlinks to a file (and to a
    directory) outside it, loaded by path.
    Defence: PERMISSION_DENIED; the outside bytes never arrive."""
    models, outside = shared_dir / "models", shared_dir / "outside"
    models.mkdir(mode=0o755)
    outside.mkdir(mode=0o755)
    write_file(outside / "f", SECRET, 0o644)
    (models / "escape").symlink_to(outside / "f")
    (models / "escape-dir").symlink_to(outside)
    daemon = daemon_factory(roots_config(models), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "path_loads", runtime_dir=str(daemon.runtime_dir), paths=[str(models / "escape"), str(models / "escape-dir/f")]
    )
    victim.start()
    attacker.go()
    outcomes = attacker.result()["outcomes"]
    served = victim.stop()
    assert_no_secret(outcomes)
    assert [o["status"] for o in outcomes] == ["PERMISSION_DENIED", "PERMISSION_DENIED"], outcomes
    assert_served(served)
    assert_recovered(daemon, before)


def test_symlink_swapped_while_the_daemon_resolves_it(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: in a directory of the loading root it owns, uid 12345 keeps
    swapping (renameat2 RENAME_EXCHANGE) a real directory holding a
    benign file with a symlink to a directory outside the root, while it
    loads the benign file's path 200 times: a daemon that checks the path,
    then opens it again by name, opens the outside file whenever a swap
    lands in between (the attacker could read that file itself; the root
    is the policy at stake).
    Defence: never the outside bytes (any status, or the benign bytes)."""
    models, outside = shared_dir / "models", shared_dir / "outside"
    models.mkdir(mode=0o755)
    outside.mkdir(mode=0o755)
    write_file(outside / "f", SECRET, 0o644)
    home = attacker_dir(models, "attacker")
    daemon = daemon_factory(roots_config(models), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "symlink_race", runtime_dir=str(daemon.runtime_dir), home=str(home), outside=str(outside), attempts=200
    )
    victim.start()
    attacker.go()
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    print(f"200 loads while swapping ({result['swaps']} swaps): {result['counts']}")
    assert result["counts"].get("outside", 0) == 0, f"loads escaped the root: {result['counts']}"
    assert result["counts"].get("other bytes", 0) == 0, result["counts"]
    assert sum(result["counts"].values()) == 200
    assert_served(served)
    assert_recovered(daemon, before)


def test_paths_built_to_be_expensive(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: a 100 000-character path, and a 4000-character path of
    "a/../a/../..." steps, loaded by path.
    Defence: the long one is INVALID_ARGUMENT within 1 s, with a message
    under 400 characters (not an echo of the path); the winding one
    completes (any status) within 1 s."""
    models = shared_dir / "models"
    models.mkdir(mode=0o755)
    (models / "a").mkdir(mode=0o755)
    write_file(models / "weights.bin", os.urandom(4096), 0o644)
    long_path = str(models) + ("/" + "d" * 250) * 400
    long_path = long_path[:100_000]
    steps = (4000 - len(str(models)) - len("/weights.bin")) // len("/a/..")
    winding_path = str(models) + "/a/.." * steps + "/weights.bin"
    assert len(long_path) == 100_000
    assert 3990 <= len(winding_path) <= 4000
    daemon = daemon_factory(roots_config(models), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("path_loads", runtime_dir=str(daemon.runtime_dir), paths=[long_path, winding_path])
    victim.start()
    attacker.go()
    long_outcome, winding_outcome = attacker.result()["outcomes"]
    served = victim.stop()
    print(f"100 000-char path: {long_outcome['status']} in {long_outcome['seconds'] * 1e3:.0f} ms")
    print(f"winding path: {winding_outcome['status']} in {winding_outcome['seconds'] * 1e3:.0f} ms")
    assert long_outcome["status"] == "INVALID_ARGUMENT", long_outcome["message"][:300]
    assert long_outcome["seconds"] < 1.0
    assert long_outcome["message_len"] < 400, f"a {long_outcome['message_len']}-character message"
    assert winding_outcome["seconds"] < 1.0
    assert_served(served)
    assert_recovered(daemon, before)
