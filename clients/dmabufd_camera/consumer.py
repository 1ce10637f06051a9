"""The consumer process: gets each frame's dma-buf fds over SCM_RIGHTS, checks
the frame (maps it read-only, CRC-32 of every plane's bytesused), releases it
(closes its fds and tells the producer the buffer can be queued again).

Run by capture.ConsumerLink as `python -m dmabufd_camera.consumer FD`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import sys
import zlib
from collections import Counter

from dmabufd_common import uapi


def checksum(fds: list[int], bytesused: list[int]) -> int:
    """CRC-32 over the frame's planes, in order, each mapped read-only and
    bracketed with DMA_BUF_IOCTL_SYNC (memfds have no sync and need none)."""
    crc = 0
    for fd, used in zip(fds, bytesused, strict=True):
        if used == 0:
            continue
        with mmap.mmap(fd, used, mmap.MAP_SHARED, mmap.PROT_READ) as region:
            synced = True
            try:
                uapi.dma_buf_sync(fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
            except OSError as error:
                if error.errno != errno.ENOTTY:
                    raise
                synced = False
            try:
                view = memoryview(region)
                crc = zlib.crc32(view, crc)
                view.release()
            finally:
                if synced:
                    uapi.dma_buf_sync(fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
    return crc


def serve(sock: socket.socket) -> None:
    frames = 0
    checksums: Counter[int] = Counter()
    errors: list[str] = []
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 65536, 8)
        if not message:
            return  # the producer went away
        header = json.loads(message)
        if header.get("stop"):
            for fd in fds:
                os.close(fd)
            summary = {"frames": frames, "checksums": {str(k): v for k, v in checksums.items()}, "errors": errors}
            sock.send(json.dumps(summary).encode())
            return
        try:
            if len(fds) != len(header["bytesused"]):
                errors.append(f"frame {header['sequence']}: {len(fds)} fds for {len(header['bytesused'])} planes")
            else:
                checksums[checksum(fds, header["bytesused"])] += 1
                frames += 1
        except OSError as error:
            errors.append(f"frame {header['sequence']}: {error}")
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps({"index": header["index"], "sequence": header["sequence"]}).encode())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with socket.socket(fileno=int(args[0])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
