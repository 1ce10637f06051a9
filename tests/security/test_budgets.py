"""Budgets: a uid's quota must count the memory it really holds (released
buffers it keeps open or mapped, resident models it loaded), and parsing
a client's file must cost the daemon a bounded amount of memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOTLESS_UID, DaemonFactory
from tests.security.conftest import (
    RSS_SLACK_BYTES,
    RssWatch,
    Spawn,
    VictimOf,
    assert_recovered,
    assert_served,
    fd_links,
    footprint,
    safetensors_bytes,
    write_file,
)


def quota_config(uid_max_bytes: str) -> str:
    return f'[quota.uids.12345]\nmax_bytes = "{uid_max_bytes}"\n'


@pytest.mark.parametrize("hold", ["fd", "mapping"])
def test_released_buffer_still_held(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, hold: str
) -> None:
    """Attack: uid 12345, quota 16 MiB, allocates 16 MiB, releases it from
    its books but keeps the memory (the fd open; or only a mapping, the fd
    closed), and allocates 16 MiB again: 32 MiB held on a 16 MiB quota.
    Defence: the second allocation is RESOURCE_EXHAUSTED while the memory
    is held; once the attacker lets go, a 16 MiB allocation succeeds
    within 5 s."""
    daemon = daemon_factory(quota_config("16M"), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("quota_kept", runtime_dir=str(daemon.runtime_dir), size="16M", hold=hold, recover_s=5.0)
    victim.start()
    attacker.go()
    result = attacker.result()
    served = victim.stop()
    print(
        f"16 MiB again while the released 16 MiB is held by {hold}: {result['while_held']['status']}; "
        f"after letting go: {result['after']['status']} in {result['recovered_after_s']:.2f} s"
    )
    assert result["while_held"]["status"] == "RESOURCE_EXHAUSTED", result["while_held"]
    assert result["after"]["status"] == "OK", result["after"]
    assert result["recovered_after_s"] <= 5.0
    assert_served(served)
    assert_recovered(daemon, before)


def test_resident_model_is_charged_to_its_uid(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345, quota 8 MiB, loads a 12 MiB model with LoadModel
    (resident models live outside the buffer books).
    Defence: RESOURCE_EXHAUSTED for it; root (a big quota) loads the same
    model fine afterwards."""
    weights = np.random.default_rng(1).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    path = shared_dir / "model.safetensors"
    write_file(path, safetensors_bytes({"weights": weights}), 0o644)
    daemon = daemon_factory(quota_config("8M"), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[{"path": str(path), "open_as": "rdonly", "api": "model"}],
    )
    victim.start()
    attacker.go()
    (outcome,) = attacker.result()["outcomes"]
    served = victim.stop()
    assert outcome["status"] == "RESOURCE_EXHAUSTED", outcome["status"]
    assert_served(served)
    assert_recovered(daemon, before)
    with daemon.connect() as client, client.load_model(path) as model:
        assert model["weights"].tobytes() == weights


def million_tensor_model(path: Path, count: int = 1_000_000) -> int:
    """A safetensors file of `count` one-byte tensors (a ~60 MB header)."""
    header = b"{" + b",".join(
        b'"t%07d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(count)
    )
    header += b"}" + b" " * (-(len(header) + 1) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(count))
    path.chmod(0o644)
    return len(header)


def test_header_with_a_million_tensors(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 loads a safetensors file whose header names
    1 000 000 one-byte tensors.
    Defence: INVALID_ARGUMENT within 5 s (max_header_bytes = 16M,
    max_tensors = 65536), and the daemon's RSS never grows by more than
    24 MiB while it refuses."""
    header_bytes = million_tensor_model(shared_dir / "many.safetensors")
    daemon = daemon_factory('[loading]\nmax_header_bytes = "16M"\nmax_tensors = 65536\n', public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[{"path": str(shared_dir / "many.safetensors"), "open_as": "rdonly", "api": "model"}],
        deadline_s=8.0,
    )
    victim.start()
    with RssWatch(daemon.pid) as rss:
        attacker.go()
        (outcome,) = attacker.result(timeout_s=40)["outcomes"]
    served = victim.stop()
    growth = rss.peak - before.rss
    print(
        f"{header_bytes >> 20} MiB header, 1 000 000 tensors: {outcome['status']} in {outcome['seconds']:.2f} s, "
        f"daemon RSS peak {growth / 2**20:+.1f} MiB"
    )
    assert outcome["status"] == "INVALID_ARGUMENT", outcome["status"]
    assert outcome["seconds"] < 5.0
    assert growth <= RSS_SLACK_BYTES, f"the daemon's RSS grew by {growth / 2**20:.0f} MiB parsing the header"
    assert_served(served)
    assert_recovered(daemon, before)


def test_buffer_a_grant_receiver_still_holds_stays_charged(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: uid 12346, quota 16 MiB, allocates 16 MiB, grants it to uid
    12345, which redeems it and keeps the fd; 12346 releases it and
    allocates 16 MiB again (two uids working together launder a quota).
    Defence: RESOURCE_EXHAUSTED while the receiver holds the buffer (it
    stays charged to its owner); once the receiver lets go, 16 MiB is
    allocated within 5 s."""
    owner_uid = 12346
    daemon = daemon_factory(f'[quota.uids.{owner_uid}]\nmax_bytes = "16M"\n', public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    receiver = spawn("hold_granted", runtime_dir=str(daemon.runtime_dir))
    owner = spawn(
        "grant_release_reallocate",
        uid=owner_uid,
        runtime_dir=str(daemon.runtime_dir),
        to_uid=ROOTLESS_UID,
        size="16M",
        recover_s=5.0,
    )
    victim.start()
    receiver.go()
    receiver.expect("connected")
    owner.go()
    receiver.send("redeem", grant_id=owner.expect("granted")["grant_id"])
    receiver.expect("holding")
    owner.send("release")
    while_held = owner.expect("while-held")["outcome"]
    receiver.send("let-go")
    receiver.result()
    owner.send("after")
    result = owner.result()
    served = victim.stop()
    print(
        f"16 MiB again while the receiver holds the released 16 MiB: {while_held['status']}; "
        f"after it let go: {result['after']['status']} in {result['recovered_after_s']:.2f} s"
    )
    assert while_held["status"] == "RESOURCE_EXHAUSTED", while_held
    assert result["after"]["status"] == "OK", result["after"]
    assert result["recovered_after_s"] <= 5.0
    assert_served(served)
    assert_recovered(daemon, before)


def test_model_released_but_still_held_stays_charged(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345, quota 16 MiB, loads a 12 MiB model, keeps copies
    of its buffers' fds, releases the model, and loads another 12 MiB
    model (24 MiB reachable on a 16 MiB quota; evicted, the first would
    live on in those fds, charged to nobody).
    Defence: RESOURCE_EXHAUSTED while the copies are held; once they are
    closed, the second model loads within 5 s."""
    paths = []
    for seed in (1, 2):
        weights = np.random.default_rng(seed).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
        path = shared_dir / f"model{seed}.safetensors"
        write_file(path, safetensors_bytes({"weights": weights}), 0o644)
        paths.append(str(path))
    daemon = daemon_factory(quota_config("16M"), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("model_kept", runtime_dir=str(daemon.runtime_dir), first=paths[0], second=paths[1], recover_s=5.0)
    victim.start()
    attacker.go()
    result = attacker.result()
    served = victim.stop()
    print(
        f"second model while {result['kept']} fds of the released first are held: {result['while_held']['status']}; "
        f"after letting go: {result['after']['status']} in {result['recovered_after_s']:.2f} s"
    )
    assert result["kept"] >= 1
    assert result["while_held"]["status"] == "RESOURCE_EXHAUSTED", result["while_held"]
    assert result["after"]["status"] == "OK", result["after"]
    assert result["recovered_after_s"] <= 5.0
    assert_served(served)
    # Both models stay resident for the next client (an fd and a read-only
    # fd of each buffer); nothing else may be left.
    assert_recovered(daemon, before, kept=lambda: sum("/memfd:dmabufd:model" in link for link in fd_links(daemon.pid)))
