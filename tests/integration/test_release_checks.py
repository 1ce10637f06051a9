"""A Release's /proc check runs in the daemon's helper processes
(service/dmabufd/sessions/holders.py), off the event loop's interpreter.
What a Release answers and charges must be right, and must not depend on
those helpers staying alive."""

from __future__ import annotations

import mmap
import os
import time

import dmabufd_client
from tests.conftest import RunningDaemon

MiB = 1 << 20


def charged(client: dmabufd_client.Client) -> int:
    (mine,) = [entry for entry in client.stats().clients if entry.session_id == client.session_id]
    return mine.charged_bytes


def test_release_uncharges_what_nobody_holds_and_keeps_what_is_mapped(daemon: RunningDaemon) -> None:
    """The charge of a buffer closed everywhere goes with the Release; the
    charge of one the client still maps stays until the mapping goes."""
    with daemon.connect() as client:
        closed, mapped = client.allocate(MiB), client.allocate(2 * MiB)
        fd = mapped.detach()
        mapping = mmap.mmap(fd, 2 * MiB)
        os.close(fd)
        os.close(closed.detach())
        assert charged(client) == 3 * MiB
        assert client.release([closed.id, mapped.id]) == 3 * MiB
        assert charged(client) == 2 * MiB
        mapping.close()
        deadline = time.monotonic() + 5
        while charged(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert charged(client) == 0


def test_release_survives_its_helpers_being_killed(daemon: RunningDaemon) -> None:
    """The helpers die (an OOM kill, say): Releases are still answered,
    their charges are kept until the reaper finds the buffers gone, and
    the helpers are replaced, so the next Release uncharges at once."""
    with daemon.connect() as client:
        first = daemon.kill_helpers()
        assert len(first) == 2, first

        for _ in range(3):  # two find a dead helper; then one is started
            buffer = client.allocate(MiB)
            os.close(buffer.detach())
            assert client.release([buffer.id]) == MiB
        deadline = time.monotonic() + 5
        while charged(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert charged(client) == 0

        replaced = daemon.helpers()
        assert replaced, "no helper was started again"
        assert not replaced & first, (first, replaced)
        buffer = client.allocate(MiB)
        os.close(buffer.detach())
        assert client.release([buffer.id]) == MiB
        assert charged(client) == 0
        assert "failed" in daemon.log()
