"""CPU lists as taskset and /sys write them ("1", "2-3", "0,2-3"): read
from the daemon's config and from dmabufctl's options, printed back the
same way."""

from __future__ import annotations

# Linux's largest NR_CPUS; a larger number names no CPU.
MAX_CPU = 8191


def parse_cpus(text: str) -> frozenset[int]:
    """The CPUs `text` names. Raises ValueError, saying how to write it."""
    refusal = f"not a CPU list: {text!r} (write it as taskset does: 1, 2-3, 0,2-3; CPUs 0 to {MAX_CPU})"
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(refusal) from None
        if not 0 <= low <= high <= MAX_CPU:
            raise ValueError(refusal)
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """A CPU set as parse_cpus reads it back ("0,2,3")."""
    return ",".join(str(cpu) for cpu in sorted(cpus))
