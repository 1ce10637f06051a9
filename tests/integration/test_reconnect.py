"""The client library reconnects to a restarted daemon at once.

The client runs in a process of its own: gRPC shares connection state
(and its reconnect backoff) between the channels of one process, and the
fixture's health checks would otherwise reconnect it on the client's behalf.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import DaemonFactory, stop_daemon

CLIENT = """
import sys, time, dmabufd_client
runtime_dir = sys.argv[1]
old = dmabufd_client.connect(runtime_dir)
old.allocate(4096).close()
print("connected", flush=True)
sys.stdin.readline()  # the daemon has stopped
for _ in range(3):  # calls on the dead daemon: gRPC starts backing off from the address
    try:
        old.heaps()
    except dmabufd_client.Unavailable:
        pass
    time.sleep(0.05)
print("refused", flush=True)
sys.stdin.readline()  # a new daemon listens on the same sockets
started = time.monotonic()
with dmabufd_client.connect(runtime_dir) as client:
    client.allocate(4096).close()
print(time.monotonic() - started, flush=True)
"""


def test_a_new_client_works_at_once_after_a_daemon_restart(daemon_factory: DaemonFactory) -> None:
    first = daemon_factory(name="restarted")
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(first.runtime_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "connected\n"
        stop_daemon(first)
        child.stdin.write("stopped\n")
        child.stdin.flush()
        assert child.stdout.readline() == "refused\n"
        second = daemon_factory(name="restarted")
        assert second.runtime_dir == first.runtime_dir
        child.stdin.write("started\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert float(out) < 0.5, f"connect() + allocate() took {float(out):.2f} s after the restart"
