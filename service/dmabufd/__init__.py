"""dmabufd: a DMA-BUF buffer service.

Places in this package, one job each:

- heaps/      allocators (DMA heaps, udmabuf, memfd), discovery, heap choice
- sessions/   who holds what: sessions, the buffer ledger, quotas, policy
- transport/  the fd socket (SCM_RIGHTS) and the gRPC server's sockets
- api/        the gRPC servicer: requests in, ledger and heaps, fds out
- daemon.py   wires the places together; cli.py is the `dmabufd` command
"""

__version__ = "0.1.0"
