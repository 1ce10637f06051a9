"""`dmabufctl`: inspect and exercise a running dmabufd.

Every command prints a table for people, or JSON with --json for scripts.
The commands live in dmabufd_client.cli; this module is the entry point
(`python -m dmabufd_client.ctl`, the `dmabufctl` script).
"""

from __future__ import annotations

import sys

from dmabufd_client.cli.app import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
