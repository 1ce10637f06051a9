"""Image buffer pools: N frames of an image format, allocated, booked and
released as one unit, optionally kept warm for the next pool of the same
format (pool.py)."""
