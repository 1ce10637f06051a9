"""The consumer process: redeems the producer's grant for the pool (its own
fds, from dmabufd, on its own session), then for each frame index it is
sent checks the frame (maps it read-only, CRC-32 of every plane's bytesused)
and releases it (tells the producer the buffer can be queued again).

Run by capture.ConsumerLink as `python -m dmabufd_camera.consumer FD`.
"""

from __future__ import annotations

import errno
import json
import mmap
import socket
import sys
import zlib
from collections import Counter

import dmabufd_client
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
    hello = json.loads(sock.recv(65536))
    try:
        client = dmabufd_client.connect(hello["runtime_dir"])
        received = client.redeem(hello["grant"])
    except dmabufd_client.DmabufdError as error:
        sock.send(json.dumps({"ready": False, "error": str(error)}).encode())
        return
    with client, received:
        if received.pool is None:
            sock.send(json.dumps({"ready": False, "error": "the grant is not a pool"}).encode())
            return
        sock.send(json.dumps({"ready": True}).encode())
        frames_fds = [[buffer.fileno() for buffer in frame] for frame in received.pool.frames]
        frames = 0
        checksums: Counter[int] = Counter()
        errors: list[str] = []
        while True:
            message = sock.recv(65536)
            if not message:
                return  # the producer went away
            header = json.loads(message)
            if header.get("stop"):
                summary = {"frames": frames, "checksums": {str(k): v for k, v in checksums.items()}, "errors": errors}
                sock.send(json.dumps(summary).encode())
                return
            fds = frames_fds[header["index"]]
            try:
                if len(fds) != len(header["bytesused"]):
                    errors.append(f"frame {header['sequence']}: {len(fds)} fds for {len(header['bytesused'])} planes")
                else:
                    checksums[checksum(fds, header["bytesused"])] += 1
                    frames += 1
            except OSError as error:
                errors.append(f"frame {header['sequence']}: {error}")
            sock.send(json.dumps({"index": header["index"], "sequence": header["sequence"]}).encode())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with socket.socket(fileno=int(args[0])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
