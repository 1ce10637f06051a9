#!/usr/bin/env python3
"""Print heaps as dmabufd reports them appearing and going (Ctrl-C stops)."""

from __future__ import annotations

import contextlib

import dmabufd_client


def main() -> None:
    with dmabufd_client.connect() as client:
        for event in client.watch_heaps(include_existing=True):
            if event.heap is None:
                print("-- the heaps above exist now; changes follow --", flush=True)
            else:
                heap = event.heap
                print(f"{event.kind:8} {heap.name:20} {heap.backend.name.lower():9} {heap.device_path}", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
