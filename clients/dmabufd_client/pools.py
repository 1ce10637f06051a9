"""Image pools and grants, as the client sees them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dmabufd_client.buffer import Buffer


@dataclass(frozen=True)
class PlanePlacement:
    """Where a plane of every frame lives: frame buffer `buffer_index`, at `offset`."""

    buffer_index: int
    offset: int
    stride: int
    size: int


class Pool:
    """N frames of one image format; released together. Closing the pool
    closes every fd first, then releases it in the daemon (so a recycled
    pool is never handed on while this process still holds it)."""

    def __init__(
        self,
        pool_id: int,
        fourcc: str,
        size: tuple[int, int],
        planes: list[PlanePlacement],
        frames: list[list[Buffer]],
        *,
        frame_bytes: int,
        recycled: bool,
        allocation_seconds: float,
        release: Callable[[int], None] | None,
    ) -> None:
        self.id = pool_id
        self.fourcc = fourcc
        self.width, self.height = size
        self.planes = planes
        self.frames = frames
        self.frame_bytes = frame_bytes
        self.recycled = recycled
        self.allocation_seconds = allocation_seconds
        self._release = release

    @property
    def buffers(self) -> list[Buffer]:
        return [buffer for frame in self.frames for buffer in frame]

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()
        release, self._release = self._release, None
        if release is not None:
            release(self.id)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Grant:
    id: int
    # Hex, for token grants: hand it to the receiver.
    token: str


@dataclass(frozen=True)
class GrantOffer:
    id: int
    from_uid: int
    from_pid: int
    buffer_count: int
    bytes: int
    read_only: bool
    pool_id: int


@dataclass
class Redeemed:
    """Buffers received through a grant: this process's own fds (closing
    them releases nothing in the daemon: they are the owner's)."""

    grant_id: int
    buffers: list[Buffer]
    read_only: bool
    pool: Pool | None

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()

    def __enter__(self) -> Redeemed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
