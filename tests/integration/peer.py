"""A client process for integration tests: `python peer.py COMMAND ...`.

Commands (each connects to the daemon at argv[2]):
  share RUNTIME SOCKET SIZE BYTE [HEAP]
                                   allocate (from HEAP, default by usage), fill
                                   with BYTE, send the fd to the AF_UNIX socket
                                   SOCKET, then exit
  hold RUNTIME COUNT SIZE          allocate COUNT buffers, print "ready",
                                   then sleep until killed
  storm RUNTIME COUNT SIZE         allocate and release COUNT buffers one by
                                   one; print a JSON summary of outcomes
"""

from __future__ import annotations

import array
import json
import socket
import sys
import time

import dmabufd_client


def share(runtime: str, target: str, size: int, byte: int, heap: str = "") -> None:
    with dmabufd_client.connect(runtime) as client:
        buffer = client.allocate(size, heap=heap, name="shared")
        with buffer.map(dmabufd_client.Access.WRITE) as mapping:
            view = mapping.memoryview
            view[:] = bytes([byte]) * size
            del view
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(target)
            message = json.dumps({"id": buffer.id, "size": buffer.size, "kernel_name": buffer.info.kernel_name})
            sock.sendmsg(
                [message.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [buffer.fileno()]))]
            )
            sock.recv(1)  # wait until the test has the fd


def hold(runtime: str, count: int, size: int) -> None:
    client = dmabufd_client.connect(runtime)
    buffers = client.allocate_batch(size, count, name="held")
    print(json.dumps({"ids": [b.id for b in buffers], "session": client.session_id}), flush=True)
    time.sleep(3600)


def storm(runtime: str, count: int, size: int) -> None:
    outcomes: dict[str, int] = {}
    with dmabufd_client.connect(runtime) as client:
        for _ in range(count):
            try:
                client.allocate(size, name="storm").close()
                outcome = "OK"
            except dmabufd_client.DmabufdError as error:
                outcome = error.status.name if error.status else "ERROR"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps(outcomes), flush=True)


if __name__ == "__main__":
    command, runtime, *rest = sys.argv[1:]
    if command == "share":
        share(runtime, rest[0], int(rest[1]), int(rest[2]), *rest[3:4])
    elif command == "hold":
        hold(runtime, int(rest[0]), int(rest[1]))
    elif command == "storm":
        storm(runtime, int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(f"unknown command {command}")
