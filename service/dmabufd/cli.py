"""`dmabufd`: run the daemon in the foreground, logging to stderr (readable
lines, or JSON with --log-format json: observability/logs.py).

Each record reaches stderr whole and at once: logging's StreamHandler
flushes after every record, and Python (3.9 on) line-buffers stderr even
when it is no terminal. That is what init's stdio_to_kmsg needs (each
write becomes a kernel log record; a block buffer would hold them back
until it filled). Nothing is written to stdout.

The listening sockets come from init or systemd when they passed them
(transport/activation.py), else the daemon creates them in its runtime
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from dmabufd import __version__
from dmabufd.config import load_config
from dmabufd.daemon import Daemon
from dmabufd.errors import ConfigError
from dmabufd.observability.logs import configure as configure_logging
from dmabufd.transport.activation import ActivationError, take_inherited_sockets
from dmabufd.transport.runtime_dir import AlreadyRunning
from dmabufd_common.paths import RUNTIME_DIR_ENV, default_runtime_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dmabufd", description="DMA-BUF buffer service (foreground).")
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=None,
        help=f"directory for the sockets and lock (env {RUNTIME_DIR_ENV}; default /run/dmabufd as root); "
        "unused for sockets that init or systemd passed",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text: readable lines (default); json: one JSON object per line, with session, pid, uid, "
        "buffer ids and durations as fields",
    )
    parser.add_argument("--version", action="version", version=f"dmabufd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    log = logging.getLogger("dmabufd")
    # First, so the variables leave the environment before anything runs.
    try:
        inherited = take_inherited_sockets()
    except ActivationError as error:
        log.error("cannot use the sockets the service manager passed: %s", error)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    daemon = Daemon(config, args.runtime_dir or default_runtime_dir(), inherited)
    return asyncio.run(_serve(daemon, log))


async def _serve(daemon: Daemon, log: logging.Logger) -> int:
    """Run until SIGTERM or SIGINT. The loop's signal handlers are woken
    through its wake-up fd, whichever thread the signal lands on."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(number: signal.Signals) -> None:
        received.append(number)
        stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    try:
        await daemon.start()
    except AlreadyRunning as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    await stop.wait()
    log.info("received %s", received[0].name)
    await daemon.stop()
    return 0
