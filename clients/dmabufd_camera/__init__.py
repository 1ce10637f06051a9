"""dmabufd's camera client: V4L2 capture into dmabufd buffers.

`formats` (image layouts, standard library only) is imported by the daemon too;
`v4l2` is the handful of ioctls the client needs; `capture` streams frames.
"""
