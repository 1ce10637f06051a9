"""Allocators and their discovery.

backend.py   the interface every allocator implements, and Allocation
dmaheap.py   /dev/dma_heap/<name> (DMA_HEAP_IOCTL_ALLOC)
udmabuf.py   sealed memfd wrapped by /dev/udmabuf
memfd.py     sealed memfd, the embedded default
discovery.py what exists now (pyudev, or a /dev scan), and changes
registry.py  the live set of heaps, aliases and usage routes
dma_heap_json.py  Android's dma_heap.json: which heaps serve which NPU buffers
"""
