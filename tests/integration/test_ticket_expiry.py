"""Tickets sent ahead and the daemon's ticket lifetime (fd-protocol.md 3.4).

The client sends tickets ahead of the calls that use them, and the daemon
expires a ticket 60 s after it arrived. A client that sat idle for longer
than that must not name an expired spare (its call would fail
UNAUTHENTICATED): it drops spares older than fdchannel.SPARE_MAX_AGE_S.

A minute is too long to wait in a test, so the daemon here runs with a 1 s
lifetime, set by the test's own launcher (the daemon has no setting for it,
and gets none), and the client's bound is scaled down with it.
"""

from __future__ import annotations

import sys
import time

import pytest

import dmabufd_client
from dmabufd_client import fdchannel
from tests.conftest import DaemonFactory, RunningDaemon

TICKET_TTL_S = 1.0
# Runs `python -m dmabufd ARGS...` (start_daemon's command, which follows
# these words) with the session module's ticket lifetime replaced.
SHORT_TTL_LAUNCHER = (
    sys.executable,
    "-c",
    "import sys\n"
    "import dmabufd.sessions.session as session\n"
    "session.TICKET_TTL_S = float(sys.argv[1])\n"
    "from dmabufd.cli import main\n"
    "raise SystemExit(main(sys.argv[sys.argv.index('dmabufd') + 1 :]))\n",
    str(TICKET_TTL_S),
)


def ticketed_allocation(client: dmabufd_client.Client) -> None:
    """Two buffers: a batch goes through the Allocate call, which names a
    ticket (one buffer would go over the fd socket alone, with none)."""
    for buffer in client.allocate_batch(4096, 2):
        assert buffer.size == 4096
        buffer.close()


@pytest.fixture
def short_ttl_daemon(daemon_factory: DaemonFactory) -> RunningDaemon:
    return daemon_factory(wrapper=SHORT_TTL_LAUNCHER)


@pytest.fixture
def spare_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's bound, in the same proportion to the 1 s lifetime as
    the real one (30 s) to the daemon's real 60 s."""
    monkeypatch.setattr(fdchannel, "SPARE_MAX_AGE_S", TICKET_TTL_S / 2)


def test_a_spare_ticket_kept_past_the_lifetime_expires(
    short_ttl_daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the client's bound prevents, shown with the bound lifted: the
    spare sent with the first call is refused after an idle spell (and so
    the daemon under test really expires tickets after TICKET_TTL_S)."""
    monkeypatch.setattr(fdchannel, "SPARE_MAX_AGE_S", float("inf"))
    with short_ttl_daemon.connect() as client:
        ticketed_allocation(client)
        time.sleep(TICKET_TTL_S * 1.5)
        with pytest.raises(dmabufd_client.Unauthenticated, match="ticket expired"):
            ticketed_allocation(client)


@pytest.mark.usefixtures("spare_max_age")
def test_a_client_idle_past_the_ticket_lifetime_still_calls(short_ttl_daemon: RunningDaemon) -> None:
    with short_ttl_daemon.connect() as client:
        ticketed_allocation(client)
        for _ in range(2):
            time.sleep(TICKET_TTL_S * 1.5)
            ticketed_allocation(client)
            assert client.buffers() == []


@pytest.mark.usefixtures("spare_max_age")
def test_spares_used_within_the_bound_are_accepted(short_ttl_daemon: RunningDaemon) -> None:
    """Calls spread over several lifetimes, each within the bound of the
    last: every spare the client names is one the daemon still holds."""
    with short_ttl_daemon.connect() as client:
        deadline = time.monotonic() + TICKET_TTL_S * 3
        calls = 0
        while time.monotonic() < deadline:
            ticketed_allocation(client)
            calls += 1
            time.sleep(TICKET_TTL_S / 8)
        assert calls >= 16, "more calls than one burst of tickets"
