"""Loading files into buffers.

source.py       the file to read: an fd the client sent, or a path opened
                with the client's credentials
methods.py      the ways bytes move from a file into a buffer, one function each
probe.py        which of them the running kernel supports, per heap
loader.py       a load end to end: layout, allocation, parallel transfer,
                progress, cancellation, verification
safetensors.py  the safetensors header, validated
models.py       resident models shared between clients
"""
