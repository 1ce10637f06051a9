"""bench.compare's rows, the rounds that fill them, and the statistics over paired passes.

A round runs every row once, in a fixed order, and the next round again (ABAB, not AABB): the
disk of a shared VM drifts by 2x within minutes, so only passes made side by side are compared.
Ratios are per round (a row's GB/s over its reference's in the same round); the summaries are
the median with min and max over the rounds.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bench.passes import Pass

GB = 1_000_000_000
GIB = 1 << 30
FIO_PREFIX = "fio-d"  # the fio rows' keys: fio-d<depth>


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    group: str
    reference: str | None  # the ratio is this row's GB/s over that row's, in the same round


@dataclass
class RoundPass:
    round: int
    result: Pass
    ratio: float | None = None

    @property
    def wall_s(self) -> float:
        return self.result.wall_s

    @property
    def gb_s(self) -> float:
        return self.result.bytes / GB / self.result.wall_s

    @property
    def cpu_s_per_gib(self) -> float:
        return self.result.cpu_s / (self.result.bytes / GIB)

    @property
    def daemon_cpu_s_per_gib(self) -> float | None:
        """dmabufd rows: the daemon's own share of cpu_s (None for the other rows)."""
        daemon = self.result.extra.get("daemon_cpu_s")
        return daemon / (self.result.bytes / GIB) if isinstance(daemon, float) else None

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "wall_s": self.result.wall_s,
            "cpu_s": self.result.cpu_s,
            "bytes": self.result.bytes,
            "gb_s": self.gb_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "daemon_cpu_s_per_gib": self.daemon_cpu_s_per_gib,
            "ratio": self.ratio,
            "extra": self.result.extra,
        }


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Status(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class Row:
    spec: RowSpec
    status: Status = Status.OK
    reason: str | None = None
    passes: list[RoundPass] = field(default_factory=list)

    def in_round(self, number: int) -> RoundPass | None:
        return next((one for one in self.passes if one.round == number), None)

    def stat(self, name: str) -> dict[str, float] | None:
        values = [getattr(one, name) for one in self.passes]
        return spread([value for value in values if value is not None])

    @property
    def methods(self) -> list[str]:
        """What the daemon reported it did (distinct values, in order; empty for other rows)."""
        seen: list[str] = []
        for one in self.passes:
            method = one.result.extra.get("method")
            if isinstance(method, str) and method not in seen:
                seen.append(method)
        return seen

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "label": self.spec.label,
            "group": self.spec.group,
            "reference": self.spec.reference,
            "status": self.status.value,
            "reason": self.reason,
            "methods": self.methods,
            "wall_s": self.stat("wall_s"),
            "gb_s": self.stat("gb_s"),
            "cpu_s_per_gib": self.stat("cpu_s_per_gib"),
            "daemon_cpu_s_per_gib": self.stat("daemon_cpu_s_per_gib"),
            "ratio": self.stat("ratio"),
            "passes": [one.as_json() for one in self.passes],
        }


@dataclass(frozen=True)
class Step:
    """One thing a round runs: its passes fill the rows `keys`, in order (LoadModel fills two:
    the first client and the second)."""

    keys: tuple[str, ...]
    run: Callable[[], Sequence[Pass]]


def run_rounds(rows: dict[str, Row], steps: list[Step], repeat: int, tool: str) -> None:
    """Every step once per round, `repeat` rounds; a step that raises marks its rows failed
    (with the reason) and is not run again, the others go on. Progress goes to stderr."""
    for number in range(repeat):
        for step in steps:
            if any(rows[key].status is not Status.OK for key in step.keys):
                continue
            try:
                results = step.run()
            except Exception as error:  # any failure stays in its rows
                for key in step.keys:
                    rows[key].status, rows[key].reason = Status.FAILED, f"{type(error).__name__}: {error}"
                continue
            for key, result in zip(step.keys, results, strict=True):
                one = RoundPass(number, result)
                rows[key].passes.append(one)
                print(
                    f"{tool}: round {number + 1}/{repeat} {rows[key].spec.label}: "
                    f"{result.wall_s:.3f} s, {one.gb_s:.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )


def pair_ratios(rows: dict[str, Row]) -> None:
    """Each pass's GB/s over its reference row's GB/s in the same round."""
    for row in rows.values():
        reference = rows.get(row.spec.reference) if row.spec.reference else None
        if reference is None:
            continue
        for one in row.passes:
            other = reference.in_round(one.round)
            one.ratio = one.gb_s / other.gb_s if other is not None else None


class Measure(Enum):
    SPEED = "speed"  # the baseline's time over the subject's: > 1 when the subject is faster
    TIME = "time"  # the subject's time over the baseline's
    DAEMON_CPU = "daemon-cpu"  # the daemon's own CPU s/GiB over the baseline's CPU s/GiB


@dataclass(frozen=True)
class Comparison:
    """A figure the issue asks for: the subject row against the baseline row, per round, then
    the median [min-max] over the rounds."""

    name: str
    subject: str
    baseline: str
    measure: Measure

    def value(self, subject: RoundPass, baseline: RoundPass) -> float | None:
        if self.measure is Measure.SPEED:
            return baseline.wall_s / subject.wall_s
        if self.measure is Measure.TIME:
            return subject.wall_s / baseline.wall_s
        daemon = subject.daemon_cpu_s_per_gib
        # A baseline that used no measurable CPU has no ratio.
        return daemon / baseline.cpu_s_per_gib if daemon is not None and baseline.cpu_s_per_gib else None

    def evaluate(self, rows: dict[str, Row]) -> dict[str, Any]:
        subject, baseline = rows[self.subject], rows[self.baseline]
        values: list[float] = []
        for one in subject.passes:
            other = baseline.in_round(one.round)
            value = None if other is None else self.value(one, other)
            if value is not None:
                values.append(value)
        return {
            "name": self.name,
            "subject": self.subject,
            "baseline": self.baseline,
            "measure": self.measure.value,
            "rounds": len(values),
            "value": spread(values),
        }


def best_fio(rows: dict[str, Row]) -> str | None:
    """The fio row with the highest median GB/s."""
    candidates = [row for key, row in rows.items() if key.startswith(FIO_PREFIX) and row.passes]
    best = max(candidates, key=lambda row: (row.stat("gb_s") or {"median": 0.0})["median"], default=None)
    return best.spec.key if best is not None else None


def comparisons(rows: dict[str, Row], depth: int) -> list[Comparison]:
    """The issue's acceptance figures, for the rows that exist."""
    fio = f"{FIO_PREFIX}{depth}"
    found = [
        Comparison(f"LoadFile vs fio depth {depth}, cold", "loadfile", fio, Measure.SPEED),
        Comparison(
            f"LoadFile vs raw O_DIRECT into a fresh memfd, depth {depth}", "loadfile", "raw-fresh", Measure.SPEED
        ),
        Comparison(f"LoadFile daemon CPU s/GiB over fio depth {depth}'s", "loadfile", fio, Measure.DAEMON_CPU),
        Comparison(f"LoadFile, memfd reserve vs fio depth {depth}, cold", "loadfile-reserve", fio, Measure.SPEED),
        Comparison("LoadFile, memfd reserve vs LoadFile, cold", "loadfile-reserve", "loadfile", Measure.SPEED),
        Comparison(
            f"LoadFile, memfd reserve: daemon CPU s/GiB over fio depth {depth}'s",
            "loadfile-reserve",
            fio,
            Measure.DAEMON_CPU,
        ),
    ]
    best = best_fio(rows)
    if best is not None and best != fio:
        depth_text = best.removeprefix(FIO_PREFIX)
        found.insert(
            1, Comparison(f"LoadFile vs fio at its best depth ({depth_text}), cold", "loadfile", best, Measure.SPEED)
        )
        found.insert(
            5,
            Comparison(
                f"LoadFile, memfd reserve vs fio at its best depth ({depth_text}), cold",
                "loadfile-reserve",
                best,
                Measure.SPEED,
            ),
        )
    for state in ("cold", "warm"):
        subject = f"loadmodel-{state}"
        found += [
            Comparison(
                f"LoadModel time over LoadFile's, same file, {state}", subject, f"loadfile-model-{state}", Measure.TIME
            ),
            Comparison(
                f"LoadModel vs safetensors.numpy.load_file, {state}", subject, f"st-load-file-{state}", Measure.SPEED
            ),
            Comparison(
                f'LoadModel vs safe_open(framework="numpy"), {state}', subject, f"safe-open-{state}", Measure.SPEED
            ),
        ]
    found.append(
        Comparison("LoadModel, second client vs the first", "loadmodel-second", "loadmodel-cold", Measure.SPEED)
    )
    return [item for item in found if item.subject in rows and item.baseline in rows]
