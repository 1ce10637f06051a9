#!/usr/bin/env python3
"""Two processes share one buffer: a producer allocates it from dmabufd and
fills it; a consumer process receives the fd over a socketpair and checks
it. The daemon books the buffer to the producer; the consumer needs no
session of its own.

    python clients/examples/producer_consumer.py [--heap system] [--size 1M]
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import socket
import subprocess
import sys

import numpy as np

import dmabufd_client
from dmabufd_client import Access
from dmabufd_common import uapi
from dmabufd_common.units import parse_size


def consume(sock: socket.socket, size: int, is_dma_buf: bool) -> str:
    """The consumer's side: map the received fd, read it under sync."""
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    (fd,) = fds
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as region:
        if is_dma_buf:
            uapi.dma_buf_sync(fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
        digest = hashlib.sha256(region).hexdigest()
        if is_dma_buf:
            uapi.dma_buf_sync(fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
    return digest


def produce(heap: str, size: int) -> int:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with dmabufd_client.connect() as client, client.allocate(size, heap=heap, name="example") as buffer:
        with buffer.map(Access.WRITE) as mapping:
            pattern = mapping.numpy()
            pattern[:] = np.arange(pattern.size) % 251
            del pattern
        with buffer.map(Access.READ) as mapping:
            expected = hashlib.sha256(mapping.memoryview).hexdigest()
        consumer = subprocess.Popen(
            [sys.executable, __file__, "--consumer-fd", str(child_end.fileno()), "--size", str(buffer.size)]
            + (["--dma-buf"] if buffer.is_dma_buf else []),
            pass_fds=[child_end.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        child_end.close()
        socket.send_fds(parent_end, [b"buffer"], [buffer.fileno()])
        received, _ = consumer.communicate(timeout=60)
        received = received.strip()
    verdict = "same" if received == expected else "DIFFERENT"
    print(f"heap {buffer.info.heap}: producer {expected[:16]}, consumer {received[:16]}: {verdict}")
    return 0 if received == expected else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--heap", default="", help="heap name (default: by usage)")
    parser.add_argument("--size", default="1M")
    parser.add_argument("--consumer-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dma-buf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer_fd is not None:
        with socket.socket(fileno=args.consumer_fd) as sock:
            print(consume(sock, parse_size(args.size), args.dma_buf))
        return 0
    return produce(args.heap, parse_size(args.size))


if __name__ == "__main__":
    sys.exit(main())
