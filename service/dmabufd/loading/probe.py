"""What the running kernel can do, asked of the kernel itself.

Only direct copy_file_range into a dma-buf needs asking: it exists only on
the product's patched kernel. The probe copies two pages from a memfd into
a fresh buffer of the heap. Three answers are possible:

- a stock kernel refuses at once: EINVAL on 6.12 (a dma-buf has no
  copy_file_range and is not a regular file); older kernels say EXDEV
  only after the same regular-file check, so EINVAL is what they give too;
- the series' first version copies, and the probe checks the bytes
  arrived, so a kernel that accepts the call but moves nothing is not
  trusted;
- the series' second version copies only with files on a block device and
  answers EXDEV for the memfd: that answer exists only on a kernel that
  has the path (per load, the loader then uses it only for files on a
  block device; verify=True checks what a load moved). It gives that
  answer before it asks the exporter, so a heap whose exporter has no
  support (CMA) looks capable here: its first load meets EOPNOTSUPP and
  the heap loses the method then (loader.py).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os

from dmabufd.heaps.backend import PAGE_SIZE, BackendKind, HeapBackend
from dmabufd.loading.method import Method
from dmabufd.loading.methods import APPLICABLE
from dmabufd_common import uapi

log = logging.getLogger(__name__)

# What a kernel without the series answers.
UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF})
# What the series (v2) answers for a source that is not on a block device.
NOT_BLOCK_BACKED = errno.EXDEV
PROBE_BYTES = 2 * PAGE_SIZE


def copy_file_range_works(backend: HeapBackend) -> bool:
    pattern = bytes(range(256)) * (PROBE_BYTES // 256)
    source = os.memfd_create("dmabufd-probe", os.MFD_CLOEXEC)
    try:
        os.write(source, pattern)
        allocation = backend.allocate(PROBE_BYTES, "dmabufd:probe")
    except OSError as error:
        os.close(source)
        log.warning("probe: cannot allocate from %s: %s", backend.spec.name, error)
        return False
    try:
        try:
            copied = os.copy_file_range(source, allocation.fd, PROBE_BYTES, 0, 0)
        except OSError as error:
            if error.errno == NOT_BLOCK_BACKED:
                log.info(
                    "probe: the kernel copies into %s directly from files on block devices (if its exporter can)",
                    backend.spec.name,
                )
                return True
            if error.errno not in UNSUPPORTED_ERRNOS:
                log.warning("probe: copy_file_range into %s: %s", backend.spec.name, error)
            return False
        with mmap.mmap(allocation.fd, PROBE_BYTES, prot=mmap.PROT_READ) as region:
            uapi.dma_buf_sync(allocation.fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
            arrived = region[:copied] == pattern[:copied]
            uapi.dma_buf_sync(allocation.fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
        if not (copied > 0 and arrived):
            log.warning(
                "probe: copy_file_range into %s returned %d but the bytes did not arrive", backend.spec.name, copied
            )
        return copied > 0 and arrived
    finally:
        allocation.close()
        os.close(source)


def supported_methods(backend: HeapBackend) -> tuple[Method, ...]:
    """The methods that work into `backend`'s buffers here, fastest first."""
    methods = APPLICABLE[backend.spec.kind]
    if backend.spec.kind is not BackendKind.MEMFD and not copy_file_range_works(backend):
        methods = tuple(method for method in methods if method is not Method.DIRECT_CFR)
    return methods
