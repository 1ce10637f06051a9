"""bench.compare's report as text: a table per group and the comparisons, or the same as Markdown
(for bench/README.md). Works from the JSON report alone, so a saved run prints again."""

from __future__ import annotations

from typing import Any

from dmabufd_common.units import format_size

WIDTH = 60  # of the row labels in the table
GROUP_TITLES = {
    "file": "cold file",
    "model-cold": "safetensors model, cold (not in the page cache)",
    "model-warm": "safetensors model, warm (all in the page cache)",
}


def _spread_text(value: dict[str, float] | None, digits: int, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value['median']:.{digits}f}{suffix} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"


def reported_text(row: dict[str, Any]) -> str:
    """What the daemon said it did, from the last pass: the method(s), parallelism, where the
    bytes came from (per source of the file's parts), and for LoadModel whether it was shared."""
    passes = row["passes"]
    if not passes or "reported" not in passes[-1]["extra"]:
        return ""
    extra = passes[-1]["extra"]
    reported = extra["reported"]
    parts = ["/".join(row["methods"]), f"parallelism {reported['parallelism']}"]
    by_source: dict[str, int] = {}
    for part in reported["parts"]:
        by_source[part["source"]] = by_source.get(part["source"], 0) + part["length"]
    if by_source:
        parts.append(" + ".join(f"{source} {format_size(size)}" for source, size in by_source.items()))
    if reported.get("prepared_bytes"):
        parts.append(f"into prepared memory {format_size(reported['prepared_bytes'])}")
    shared = [one["extra"].get("shared") for one in passes]
    if row["key"] == "loadmodel-second":
        parts.append("shared" if all(shared) else "NOT shared in some passes: loaded again")
    elif any(shared):
        parts.append("SHARED in some passes: nothing was loaded")
    return ", ".join(parts)


def row_cells(row: dict[str, Any]) -> list[str]:
    """label, wall s, GB/s, CPU s/GiB, the daemon's share of it, ratio, reported; for a row that
    did not run: label and why."""
    label = row["label"] + (" (reference)" if row["reference"] is None else "")
    if row["status"] != "ok":
        return [label, f"{row['status']}: {row['reason']}"]
    daemon = row["daemon_cpu_s_per_gib"]
    return [
        label,
        _spread_text(row["wall_s"], 3),
        _spread_text(row["gb_s"], 2),
        _spread_text(row["cpu_s_per_gib"], 3),
        "" if daemon is None else f"{daemon['median']:.3f}",
        "" if row["reference"] is None else _spread_text(row["ratio"], 2, "x"),
        reported_text(row),
    ]


def _comparison_value(item: dict[str, Any]) -> str:
    return "not measured" if item["value"] is None else _spread_text(item["value"], 2, "x")


def header(report: dict[str, Any]) -> list[str]:
    machine = report["machine"]
    before, after = machine["before"], machine["after"]
    lines = [
        f"{report['tool']} {report['date']}, kernel {report['kernel']}, {machine['cpus']} CPUs; load average "
        f"{' '.join(f'{v:.2f}' for v in before['loadavg'])} at start, {after['loadavg'][0]:.2f} at end; "
        f"qemu-system processes {before['qemu_processes']} at start, {after['qemu_processes']} at end",
    ]
    files = report["files"]
    if files["raw"]:
        raw = files["raw"]
        lines.append(f"file: {raw['path']} ({format_size(raw['size'])}, {raw['fs_type']})")
    if files["model"]:
        model = files["model"]
        lines.append(
            f"model: {model['path']} ({format_size(model['size'])}, {model['fs_type']}, {model['tensors']} tensors: "
            f"{'/'.join(model['dtypes'])})"
        )
        lines += [f"note: {note}" for note in model["notes"]]
    lines.append(f"cold: {report['cache']['cold']}; warm: {report['cache']['warm']}")
    checked = report["summary"]["cached_before"]
    if checked["cold_max"] is not None or checked["warm_min"] is not None:
        cold = "-" if checked["cold_max"] is None else f"{checked['cold_max']:.0%}"
        warm = "-" if checked["warm_min"] is None else f"{checked['warm_min']:.0%}"
        lines.append(f"cached before a pass (mincore): cold at most {cold} of the file, warm at least {warm}")
    fio = report["fio"]
    fio_text = f"{fio['version']} ({fio['engine']})" if fio else f"not run ({report['fio_missing']})"
    lines.append(f"fio: {fio_text}; dmabufd: {report['daemon']}")
    repeat = report["options"]["repeat"]
    lines.append(
        f"{repeat} round{'' if repeat == 1 else 's'}, every row once per round in the order below; medians "
        "[min-max]; ratio: the row's GB/s over its reference's in the same round"
    )
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as text tables."""
    lines = header(report)
    head = f"{'row':<{WIDTH}} {'wall s':>19} {'GB/s':>16} {'CPU s/GiB':>19} {'daemon':>6} {'ratio':>19}  reported"
    for group, title in GROUP_TITLES.items():
        members = [row for row in report["rows"] if row["group"] == group]
        if not members:
            continue
        lines += ["", f"== {title}", head]
        for row in members:
            cells = row_cells(row)
            if len(cells) == 2:
                lines.append(f"{cells[0]:<{WIDTH}} {cells[1]}")
                continue
            label, wall, rate, cpu, daemon, ratio, reported = cells
            lines.append(f"{label:<{WIDTH}} {wall:>19} {rate:>16} {cpu:>19} {daemon:>6} {ratio:>19}  {reported}")
    lines += ["", "== comparisons (per round, then the median [min-max])"]
    lines += [f"{item['name']:<70} {_comparison_value(item)}" for item in report["summary"]["comparisons"]]
    if report["summary"]["fio_best"]:
        lines.append(f"fio's best depth: {report['summary']['fio_best'].removeprefix('fio-d')}")
    lines.append(
        "GB/s: 10^9 bytes/s. CPU s/GiB: for dmabufd the daemon's (/proc/<pid>/stat, alone: daemon) plus the client's, "
        "for fio its usr+sys, for the others this process's rusage"
    )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The header lines, then the groups and comparisons as Markdown tables."""
    lines = [f"    {line}" for line in header(report)]
    for group, title in GROUP_TITLES.items():
        members = [row for row in report["rows"] if row["group"] == group]
        if not members:
            continue
        lines += [
            "",
            f"{title}:",
            "",
            "| row | wall s | GB/s | CPU s/GiB | daemon CPU s/GiB | ratio | reported |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in members:
            cells = [cell.replace("|", "\\|") for cell in row_cells(row)]
            lines.append("| " + " | ".join(cells) + " |" + "|" * (7 - len(cells)))
    lines += ["", "| comparison (per round, then the median [min-max]) | value |", "| --- | ---: |"]
    lines += [f"| {item['name']} | {_comparison_value(item)} |" for item in report["summary"]["comparisons"]]
    return "\n".join(lines)
