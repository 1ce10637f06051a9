"""Benchmarks that reproduce published numbers against dmabufd and raw syscalls.

compare: dmabufd's LoadFile and LoadModel beside fio, a raw O_DIRECT reader and
safetensors' numpy loaders, cold and warm, in alternating rounds (`make
bench-load`). load_modes: the file-loading benchmark of the dma-buf direct I/O
series (the eight raw modes of ../shared/reference/seed-benchmark.md, plus the
same load through dmabufd). See bench/README.md.
"""
