"""The gRPC API: servicer.py implements dmabufd.v1.BufferService."""
