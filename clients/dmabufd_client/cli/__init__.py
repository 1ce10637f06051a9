"""dmabufctl, one module per command group; app.py holds the parser, the
global options and the error handling."""
