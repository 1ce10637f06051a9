"""Benchmarks that reproduce published numbers against dmabufd and raw syscalls.

load_modes: the file-loading benchmark of the dma-buf direct I/O series (the
eight raw modes of ../shared/reference/seed-benchmark.md, plus the same load
through dmabufd). See bench/README.md.
"""
