"""Entry point for running the host tests as one binary (Android's
python_test_host in Android.bp.sample): the unit tests, which need no
daemon, no VM and no device."""

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-q", str(Path(__file__).resolve().parent / "unit"), *sys.argv[1:]]))
