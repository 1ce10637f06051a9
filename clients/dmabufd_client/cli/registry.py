"""The signature by which command modules register themselves."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol


class AddCommand(Protocol):
    def __call__(
        self,
        name: str,
        help_text: str,
        run: Callable[[Any, argparse.Namespace], int],
        epilog: str = "",
        *,
        session: bool = True,
    ) -> argparse.ArgumentParser: ...
