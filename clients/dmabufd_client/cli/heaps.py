"""`heaps` and `watch`: what the daemon can allocate from."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from rich.table import Table

from dmabufd_client.cli import output
from dmabufd_client.cli.output import HEAP, VERSION_KEY, Schema
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import Client
from dmabufd_client.errors import DmabufdError
from dmabufd_common.units import format_size

NPU_ROUTE = Schema(
    "an NPU route (Android's dma_heap.json: tried before the usage's own route)",
    (
        ("buffer_type", 'the NPU buffer type, e.g. "MODEL_WEIGHTS"'),
        ("npu_device", "the NPU (0: the first)"),
        ("usage", "the usage hint the type routes as"),
        ("heap_order", "heap names, the first present and allowed wins"),
    ),
)

HEAPS = Schema(
    "the object",
    (
        VERSION_KEY,
        ("heaps", "the heaps, as below"),
        ("usage_routes", "usage hint -> heap names in preference order"),
        ("dma_heap_json", "the dma_heap.json the daemon routes NPU buffer types by; null: none"),
        ("npu_routes", "that file's routes, as below (empty without one)"),
    ),
    (HEAP, NPU_ROUTE),
)

WATCH_EVENT = Schema(
    "each line",
    (
        VERSION_KEY,
        ("event", '"added", "removed", or "synced" (the current heaps have been listed)'),
        ("heap", "the heap, as below; null for synced"),
    ),
    (HEAP,),
)


def cmd_heaps(client: Client, args: argparse.Namespace) -> int:
    heaps = client.heaps()
    routes = client.usage_routes()
    npu = client.npu_routes()
    if args.json:
        output.emit_json(
            output.versioned(
                HEAPS,
                heaps=[output.heap_json(h) for h in heaps],
                usage_routes={usage: list(order) for usage, order in sorted(routes.items())},
                dma_heap_json=npu.source or None,
                npu_routes=[
                    NPU_ROUTE.object(
                        buffer_type=route.buffer_type,
                        npu_device=route.npu_device,
                        usage=route.usage,
                        heap_order=list(route.heap_order),
                    )
                    for route in npu.routes
                ],
            )
        )
        return 0
    table = Table(title="heaps")
    for column in ("name", "backend", "device", "importable", "max buffer", "aliases", "allowed"):
        table.add_column(column)
    for heap in heaps:
        table.add_row(
            heap.name,
            heap.backend.name.lower(),
            heap.device_path or "-",
            "yes" if heap.device_importable else "no",
            format_size(heap.max_buffer_bytes) if heap.max_buffer_bytes else "no limit",
            ", ".join(heap.aliases) or "-",
            "yes" if heap.allowed else "no",
        )
    output.stdout.print(table)
    for heap in heaps:
        if heap.reserve_bytes:
            ready = (
                "how much is ready is told to admins only"
                if heap.reserve_ready_bytes is None
                else f"{format_size(heap.reserve_ready_bytes)} ready"
            )
            output.stdout.print(
                f"{heap.name}: a {format_size(heap.reserve_bytes)} reserve of prepared memfds for loads; {ready}",
                highlight=False,
            )
    routes_table = Table(title="usage routes (first present and allowed heap wins)")
    routes_table.add_column("usage")
    routes_table.add_column("heap order")
    for usage, order in sorted(routes.items()):
        routes_table.add_row(usage, " -> ".join(order))
    output.stdout.print(routes_table)
    if npu.source:
        npu_table = Table(
            title=f"NPU routes from {npu.source} (before the usage routes; first present and allowed wins)"
        )
        for column in ("buffer type", "NPU", "usage", "heap order"):
            npu_table.add_column(column)
        for route in npu.routes:
            npu_table.add_row(route.buffer_type, str(route.npu_device), route.usage, " -> ".join(route.heap_order))
        output.stdout.print(npu_table)
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    """Until Ctrl-C, --count events or --timeout seconds, whichever comes
    first; each ends it with exit code 0. The time limit holds with no
    events at all: it ends the stream by closing the session."""
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        client.close()  # cancels the stream: watch_heaps() then just ends

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Not KeyboardInterrupt: raised wherever the main thread happens to
        # be (inside grpc's or the fd channel's locks), it can leave the
        # client unable to close, and the command hangs. Ctrl-C stops the
        # stream the way the time limit does, from another thread.
        threading.Thread(target=stop, name="watch-interrupt", daemon=True).start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts outright

    timer = threading.Timer(args.timeout, stop) if args.timeout is not None else None
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    seen = 0
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        for event in client.watch_heaps(include_existing=not args.no_existing):
            if args.json:
                heap = output.heap_json(event.heap) if event.heap else None
                output.emit_json(output.versioned(WATCH_EVENT, event=event.kind, heap=heap), lines=True)
            elif event.heap is None:
                output.stdout.print(f"[dim]{event.kind}[/dim]")
            else:
                output.stdout.print(f"{event.kind:8} {event.heap.name} ({event.heap.backend.name.lower()})")
            if event.kind != "synced":
                seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
        pass
    except DmabufdError:
        if not stopped.is_set():  # Ctrl-C or the time limit just as the stream started
            raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
        if timer is not None:
            timer.cancel()
    return 0


def register(add: AddCommand) -> None:
    add("heaps", "list heaps, their capabilities and usage routes", cmd_heaps, output.document(HEAPS))

    watch = add(
        "watch",
        "print heaps as they appear and go, until Ctrl-C or --timeout seconds (exit 0)",
        cmd_watch,
        output.document(WATCH_EVENT, "one object per line (JSON Lines), flushed as events happen"),
    )
    watch.add_argument("--no-existing", action="store_true", help="only changes, not the heaps present now")
    watch.add_argument(
        "--count",
        type=output.positive_int,
        default=0,
        metavar="N",
        help="stop after N added/removed events (default: no limit)",
    )
