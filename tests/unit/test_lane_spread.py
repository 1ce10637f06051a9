"""Spreading a load's writes over several memfds: a memfd accepts one write
at a time, so models bound for memfds are cut into several buffers
(models.part_bytes, plan_model) and the lanes take chunks from each buffer
in turn (transfer.lane_order)."""

from __future__ import annotations

import os

from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.loading.method import Method
from dmabufd.loading.methods import Piece
from dmabufd.loading.models import MEMFD_MODEL_PART_BYTES, part_bytes, plan_model
from dmabufd.loading.safetensors import Header, TensorEntry
from dmabufd.loading.transfer import chunks, lane_order

MiB = 1 << 20


def header(*sizes: int, start: int = 8 + 120) -> Header:
    tensors = []
    position = start
    for index, size in enumerate(sizes):
        tensors.append(TensorEntry(f"t{index}", "U8", (size,), position, position + size))
        position += size
    return Header(start, tuple(tensors), {})


def test_a_large_memfd_model_is_cut_into_equal_shares() -> None:
    model = header(*[64 * MiB] * 8)  # 512 MiB
    part = part_bytes(model, BackendKind.MEMFD, Method.DIRECT_READ)
    assert part is not None
    assert part == MEMFD_MODEL_PART_BYTES == 128 * MiB
    plans, placement = plan_model(model, largest=1 << 40, part=part)
    assert [plan.piece.length for plan in plans] == [128 * MiB] * 4
    assert {placement[f"t{i}"][0] for i in range(8)} == {0, 1, 2, 3}


def test_shares_are_even_and_never_cut_a_tensor() -> None:
    model = header(*[30 * MiB] * 10)  # 300 MiB: three shares of 100 MiB, give or take a tensor
    part = part_bytes(model, BackendKind.MEMFD, Method.DIRECT_READ)
    assert part == 100 * MiB
    plans, placement = plan_model(model, largest=1 << 40, part=part)
    assert [plan.piece.length // MiB for plan in plans] == [90, 120, 90]
    for tensor in model.tensors:
        index, offset = placement[tensor.name]
        plan = plans[index]
        assert offset + tensor.nbytes <= plan.piece.buffer_offset + plan.piece.length


def test_a_tensor_larger_than_a_share_gets_a_buffer_of_its_own() -> None:
    model = header(4 * MiB, 300 * MiB, 4 * MiB)
    part = part_bytes(model, BackendKind.MEMFD, Method.DIRECT_READ)
    assert part is not None
    assert part < 300 * MiB
    plans, placement = plan_model(model, largest=1 << 40, part=part)
    assert [placement[name][0] for name in ("t0", "t1", "t2")] == [0, 1, 2]
    assert plans[1].piece.length == 300 * MiB


def test_models_stay_whole_where_writes_do_not_queue() -> None:
    large = header(*[64 * MiB] * 8)
    assert part_bytes(header(8 * MiB, 100 * MiB), BackendKind.MEMFD, Method.DIRECT_READ) is None
    assert part_bytes(large, BackendKind.MEMFD, Method.SPLICE) is None
    assert part_bytes(large, BackendKind.UDMABUF, Method.DIRECT_READ) is None
    assert part_bytes(large, BackendKind.DMA_HEAP, Method.DIRECT_CFR) is None
    assert part_bytes(Header(8, (), {}), BackendKind.MEMFD, Method.DIRECT_READ) is None
    plans, _ = plan_model(large, largest=1 << 40)
    assert len(plans) == 1


def allocation(size: int, kind: BackendKind = BackendKind.MEMFD) -> Allocation:
    fd = os.memfd_create("lane-order")
    os.ftruncate(fd, size)
    return Allocation(fd, size, kind)


def test_lanes_take_each_buffer_in_turn_when_they_write_into_memfds() -> None:
    first, second = allocation(48 * MiB), allocation(16 * MiB)
    try:
        work = [
            (target, chunk)
            for target, piece in ((first, Piece(0, 0, 48 * MiB)), (second, Piece(48 * MiB, 0, 16 * MiB)))
            for chunk in chunks(piece, 16 * MiB)
        ]
        spread = lane_order(work, Method.DIRECT_READ)
        assert [(target is first, chunk.file_offset // MiB) for target, chunk in spread] == [
            (True, 0),
            (False, 48),
            (True, 16),
            (True, 32),
        ]
        assert sorted(spread, key=lambda item: item[1].file_offset) == work
        assert lane_order(work, Method.BUFFERED_READ) == spread
        assert lane_order(work, Method.DIRECT_CFR) == work, "file order, for readahead"
    finally:
        os.close(first.fd)
        os.close(second.fd)


def test_lanes_keep_file_order_where_they_fill_mappings() -> None:
    """Buffered-read into heap buffers or udmabufs maps them, takes no
    writer lock and gains nothing from a spread: file order, for readahead
    and for the order streamed tensors become ready."""
    for kind in (BackendKind.DMA_HEAP, BackendKind.UDMABUF):
        first, second = allocation(32 * MiB, kind), allocation(32 * MiB, kind)
        try:
            work = [
                (target, chunk)
                for target, piece in ((first, Piece(0, 0, 32 * MiB)), (second, Piece(32 * MiB, 0, 32 * MiB)))
                for chunk in chunks(piece, 16 * MiB)
            ]
            assert lane_order(work, Method.BUFFERED_READ) == work
            spread = lane_order(work, Method.DIRECT_READ)
            assert (spread != work) is (kind is BackendKind.UDMABUF), "direct-read writes a udmabuf's cached parts"
        finally:
            os.close(first.fd)
            os.close(second.fd)
