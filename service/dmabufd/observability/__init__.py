"""What the daemon tells its operators: log lines (readable or JSON, logs.py)
and metrics in the Prometheus text format (metrics.py)."""
