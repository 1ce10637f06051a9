"""`dmabufd`: run the daemon in the foreground, logging to stderr."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from dmabufd import __version__
from dmabufd.config import load_config
from dmabufd.daemon import Daemon
from dmabufd.errors import ConfigError
from dmabufd.transport.runtime_dir import AlreadyRunning
from dmabufd_common.paths import RUNTIME_DIR_ENV, default_runtime_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dmabufd", description="DMA-BUF buffer service (foreground).")
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=None,
        help=f"directory for the sockets and lock (env {RUNTIME_DIR_ENV}; default /run/dmabufd as root)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"dmabufd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s dmabufd %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("dmabufd")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    # Block the stop signals before any thread exists: every thread inherits
    # the mask, so SIGTERM/SIGINT stay pending until sigwait() below takes
    # them. (A Python handler runs only on the main thread, and only once
    # it runs bytecode again: a signal delivered to a gRPC thread while the
    # main thread sleeps in a lock would be noticed late or never.)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    daemon = Daemon(config, args.runtime_dir or default_runtime_dir())
    try:
        daemon.start()
    except AlreadyRunning as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    received = signal.sigwait(stop_signals)
    log.info("received %s", signal.Signals(received).name)
    daemon.stop()
    return 0
