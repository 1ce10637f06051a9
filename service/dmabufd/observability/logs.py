"""The daemon's log: readable lines (the default) or one JSON object per
line (`--log-format json`), for a log collector to index.

A JSON line has `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`
and `message` (the formatted text, as the readable format shows it), then
every `extra` field the call passed: the daemon uses `event`, `session`,
`pid`, `uid`, `buffer_ids`, `bytes`, `heap`, `method`, `duration_s` and
`cpu_s` (see FIELDS). A logged
exception adds `exc` (its traceback as text). Values JSON cannot carry are
written as their str(). json.dumps escapes every control character, so a
message never breaks a line, whatever client input it quotes.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s dmabufd %(levelname)s %(name)s: %(message)s"

# The extra fields the daemon's own log calls use, for readers of the JSON.
FIELDS = {
    "event": "what happened: session-opened, session-closed, allocated, loaded",
    "session": "the session id (as in GetStats, dmabufctl stats)",
    "pid": "the client's pid",
    "uid": "the client's uid",
    "buffer_ids": "ids of the buffers the line is about",
    "bytes": "bytes allocated, loaded or released",
    "heap": "the heap the buffers came from",
    "method": "the load method (direct-cfr, sendfile, buffered-read, ...)",
    "duration_s": "how long it took (a load) or lasted (a session), in seconds",
    "cpu_s": "the daemon CPU time a load cost, in seconds",
}

# Attributes every LogRecord has: anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure(level: str, log_format: LogFormat) -> None:
    """Log to stderr at `level` in `log_format`. With JSON, warnings and
    exceptions that escape a thread are logged too, so that every line the
    daemon writes is JSON (gRPC's C core writes its own, rare, lines)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if log_format == "json":
        logging.captureWarnings(True)
        threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logging.getLogger("dmabufd").critical("uncaught exception in thread %s", name, exc_info=exc_info)
