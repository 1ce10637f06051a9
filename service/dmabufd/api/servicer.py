"""dmabufd.v1.BufferService: the gRPC servicer, assembled from its parts.

base.py      collaborators, session claiming, errors to statuses
buffers.py   heaps, allocation, release, listing, stats
loading.py   LoadFile, LoadModel, ReleaseModel
sharing.py   image pools and grants
"""

from dmabufd.api.buffers import BuffersApi
from dmabufd.api.loading import LoadingApi
from dmabufd.api.sharing import SharingApi


class BufferService(BuffersApi, LoadingApi, SharingApi):
    """Every method of the service; the parts share ServiceBase's state."""
