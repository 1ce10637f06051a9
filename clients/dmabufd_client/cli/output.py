"""What every command shares: JSON with a documented schema, the two
consoles, progress bars and option types.

JSON goes to stdout and nothing else does in --json mode; tables go to
stdout; errors, hints and progress bars go to stderr (bars only when it is
a terminal).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from dmabufd_client.buffer import BufferInfo
from dmabufd_client.client import HeapInfo
from dmabufd_client.npu import MAX_NPU_DEVICE
from dmabufd_common import npu
from dmabufd_common.cpus import parse_cpus
from dmabufd_common.units import EXAMPLES, parse_size

# Bumped when a key changes meaning or goes away (new keys do not bump it).
SCHEMA_VERSION = 1

# A table piped to a file or a script is not cut to the 80 columns rich
# assumes for a non-terminal.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class Schema:
    """The keys of a JSON object, in output order, each with what it holds;
    the same list renders the --help text and builds the object."""

    title: str
    keys: tuple[tuple[str, str], ...]
    parts: tuple[Schema, ...] = ()  # the objects nested in this one

    def object(self, **values: Any) -> dict[str, Any]:
        """The object, keys in schema order; missing or extra keys are a bug."""
        names = [name for name, _ in self.keys]
        if set(values) != set(names):
            raise AssertionError(f"{self.title}: keys {sorted(values)} do not match the schema {names}")
        return {name: values[name] for name in names}

    def describe(self) -> str:
        lines = [f"{self.title}:"]
        lines += [f"  {name:<22} {meaning}" for name, meaning in self.keys]
        for part in self.parts:
            lines += ["", part.describe()]
        return "\n".join(lines)


def document(schema: Schema, lines: str = "an object") -> str:
    """The --help epilog of a command that prints `schema`."""
    return (
        f"JSON (--json) is {lines}, keys in this order; schema_version is {SCHEMA_VERSION} "
        f"(it changes only when a key changes meaning or goes away).\n\n{schema.describe()}"
    )


def versioned(schema: Schema, **values: Any) -> dict[str, Any]:
    return schema.object(schema_version=SCHEMA_VERSION, **values)


def emit_json(value: Mapping[str, Any], *, lines: bool = False) -> None:
    """One JSON document on stdout (lines: one compact line, flushed)."""
    if lines:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    else:
        json.dump(value, sys.stdout, indent=2)
        sys.stdout.write("\n")


VERSION_KEY = ("schema_version", f"{SCHEMA_VERSION}: the version of this layout")

HEAP = Schema(
    "a heap",
    (
        ("name", "the name to allocate by"),
        ("backend", '"dma_heap", "udmabuf" or "memfd"'),
        ("device_path", 'its device node ("" for memfd)'),
        ("device_importable", "true when devices can import its buffers"),
        ("max_buffer_bytes", "largest single buffer"),
        ("cpu_sync_required", "CPU access needs DMA_BUF_IOCTL_SYNC"),
        ("aliases", "aliases that resolve to it first"),
        ("allowed", "whether your uid may allocate from it"),
        ("load_methods", "file load methods proved to work, fastest first"),
        ("reserve_bytes", "memfd: bytes of prepared memfds the daemon keeps (heaps.memfd_reserve)"),
        ("reserve_ready_bytes", "memfd: how much of reserve_bytes is prepared now (null: told to admins only)"),
    ),
)

BUFFER = Schema(
    "a buffer",
    (
        ("id", "daemon-wide buffer id"),
        ("size", "bytes"),
        ("heap", "the heap it came from"),
        ("backend", '"dma_heap", "udmabuf" or "memfd"'),
        ("kernel_name", "the name /proc/<pid>/fdinfo (or the memfd) shows"),
        ("usage", "the usage hint it was made for"),
        ("created_at", "seconds since the epoch"),
        ("inode", "inode of the buffer's file (fstat of its fd)"),
    ),
)


def heap_json(heap: HeapInfo) -> dict[str, Any]:
    return HEAP.object(
        name=heap.name,
        backend=heap.backend.name.lower(),
        device_path=heap.device_path,
        device_importable=heap.device_importable,
        max_buffer_bytes=heap.max_buffer_bytes,
        cpu_sync_required=heap.cpu_sync_required,
        aliases=list(heap.aliases),
        allowed=heap.allowed,
        load_methods=list(heap.load_methods),
        reserve_bytes=heap.reserve_bytes,
        reserve_ready_bytes=heap.reserve_ready_bytes,
    )


def buffer_json(info: BufferInfo) -> dict[str, Any]:
    return BUFFER.object(
        id=info.id,
        size=info.size,
        heap=info.heap,
        backend=info.backend.name.lower(),
        kernel_name=info.kernel_name,
        usage=info.usage,
        created_at=info.created_at,
        inode=info.inode,
    )


# -- progress ---------------------------------------------------------------

ProgressUpdate = Callable[..., None]


@contextmanager
def progress_bar(description: str, *, transfer: bool) -> Iterator[ProgressUpdate]:
    """A bar on stderr while the block runs, if stderr is a terminal; yields
    update(**fields) taking rich's task fields (completed, total,
    description, advance). Elsewhere update does nothing."""
    if not stderr.is_terminal:
        yield lambda **_: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn()]
    if transfer:
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn()]
    else:
        columns += [TextColumn("{task.completed}/{task.total}")]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda **fields: bar.update(task, **fields)


# -- option types -------------------------------------------------------------


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cpus(text: str) -> frozenset[int]:
    try:
        return parse_cpus(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


SIZE_HELP = f"sizes: {EXAMPLES}; 4MB is refused (ambiguous)"


def _number(kind: Callable[[str], float], check: Callable[[float], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {wanted}: {text!r}") from None
        if not check(value):  # NaN fails every check too
            raise argparse.ArgumentTypeError(f"not {wanted}: {text!r}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
seconds = _number(float, lambda v: 0 <= v < float("inf"), "a number of seconds (0 or more)")
positive_seconds = _number(float, lambda v: 0 < v < float("inf"), "a number of seconds above 0")
npu_number = _number(int, lambda v: 0 <= v <= MAX_NPU_DEVICE, "an NPU number (0 for the first)")


def add_npu_options(parser: argparse.ArgumentParser) -> None:
    """--npu-buffer-type and --npu-device, as alloc and load take them."""
    parser.add_argument(
        "--npu-buffer-type",
        type=str.upper,
        choices=[npu.android_name(number) for number in npu.USAGES],
        default=None,
        metavar="TYPE",
        help="an NPU buffer type, routed by the daemon's dma_heap.json first, then as its usage: "
        + ", ".join(f"{npu.android_name(number)} ({usage})" for number, usage in npu.USAGES.items())
        + "; --usage may repeat its usage, not contradict it",
    )
    parser.add_argument(
        "--npu-device",
        type=npu_number,
        default=None,
        metavar="N",
        help="the NPU the buffers are for (0: the first), among dma_heap.json's per-NPU heaps (default: any NPU's)",
    )
