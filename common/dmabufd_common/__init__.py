"""What the daemon and its clients share: the gRPC API, the fd-socket wire
format, the kernel uAPI numbers and size strings."""
