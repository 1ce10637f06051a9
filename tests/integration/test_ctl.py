"""dmabufctl, as a script would use it (--json, exit codes) and as a person
would (tables, hints), against real daemons."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dmabufd_client
from dmabufd_client.cli import buffers, dump, heaps, load, stats
from dmabufd_client.cli.app import build_parser
from dmabufd_client.cli.exits import EXIT_CODES, Exit
from dmabufd_client.cli.output import BUFFER, HEAP, SCHEMA_VERSION, Schema
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.cpus import parse_cpus
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME
from tests.conftest import ROOTLESS_UID, DaemonFactory, RunningDaemon

CTL = [sys.executable, "-m", "dmabufd_client.ctl"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout, check=False)


def ctl(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run("--runtime-dir", str(daemon.runtime_dir), *args)


def ctl_json(daemon: RunningDaemon, *args: str) -> Any:
    result = ctl(daemon, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def keys(schema: Schema) -> list[str]:
    return [name for name, _ in schema.keys]


def assert_schema(value: dict[str, Any], schema: Schema) -> None:
    assert list(value) == keys(schema)


def assert_numbers(value: Any) -> None:
    """No number hides in a string (protobuf's MessageToDict writes int64 so)."""
    if isinstance(value, dict):
        for item in value.values():
            assert_numbers(item)
    elif isinstance(value, list):
        for item in value:
            assert_numbers(item)
    else:
        assert not (isinstance(value, str) and value.isdigit()), value


# -- JSON: schema_version, types, key order, documented keys -------------------------


def test_heaps_json(daemon: RunningDaemon) -> None:
    result = ctl_json(daemon, "heaps")
    assert_schema(result, heaps.HEAPS)
    assert result["schema_version"] == SCHEMA_VERSION
    assert [h["name"] for h in result["heaps"]] == ["memfd"]
    memfd = result["heaps"][0]
    assert_schema(memfd, HEAP)
    assert memfd["backend"] == "memfd"
    assert isinstance(memfd["max_buffer_bytes"], int)
    assert memfd["max_buffer_bytes"] > 0
    assert result["usage_routes"]["camera"] == ["cma", "system", "udmabuf", "memfd"]


def test_alloc_json_with_suffix_sizes(daemon: RunningDaemon) -> None:
    result = ctl_json(daemon, "alloc", "--size", "4M", "--count", "3", "--name", "cli")
    assert_schema(result, buffers.ALLOC)
    assert [b["size"] for b in result["buffers"]] == [4 << 20] * 3
    assert_schema(result["buffers"][0], BUFFER)
    assert all(b["kernel_name"].endswith(":cli") for b in result["buffers"])
    assert all(isinstance(b["inode"], int) and b["inode"] > 0 for b in result["buffers"])
    assert result["seconds"] > 0
    assert ctl_json(daemon, "alloc", "--size", "64KiB")["buffers"][0]["size"] == 64 << 10


def test_stats_json_has_numbers_as_numbers(daemon: RunningDaemon) -> None:
    ctl_json(daemon, "alloc", "--size", "64K", "--count", "2")
    result = ctl_json(daemon, "stats", "--proc")
    assert_schema(result, stats.STATS)
    assert result["schema_version"] == SCHEMA_VERSION
    assert_numbers(result)
    assert result["allocations"] == 2
    assert result["releases"] == 2
    assert result["total_buffers"] == 0
    assert result["total_bytes"] == 0
    (me,) = result["clients"]  # this dmabufctl run's own session
    assert_schema(me, stats.CLIENT)
    assert isinstance(me["pid"], int)
    assert isinstance(me["quota_bytes"], int)
    assert me["quota_bytes"] == 4 << 30
    assert me["proc_checked"] is True


def test_every_command_documents_its_json_keys() -> None:
    documented = {
        "heaps": heaps.HEAPS,
        "watch": heaps.WATCH_EVENT,
        "alloc": buffers.ALLOC,
        "buffers": buffers.BUFFERS,
        "stats": stats.STATS,
        "dump": dump.DUMP,
        "load": load.LOAD,
    }
    for command, schema in documented.items():
        shown = run(command, "--help").stdout
        assert "schema_version" in shown, command
        for part in (schema, *schema.parts):
            for key in keys(part):
                assert f"  {key} " in shown, (command, key)
    assert "allocs_per_s_n_clients" in run("bench", "--help").stdout


def test_global_options_before_or_after_the_command(daemon: RunningDaemon) -> None:
    where = str(daemon.runtime_dir)
    before = run("--json", "--runtime-dir", where, "--timeout", "5", "heaps")
    after = run("heaps", "--json", "--runtime-dir", where, "--timeout", "5")
    mixed = run("--runtime-dir", where, "stats", "--json")
    for result in (before, after, mixed):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["schema_version"] == SCHEMA_VERSION
    assert json.loads(before.stdout) == json.loads(after.stdout)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("dmabufctl ")


def test_every_option_has_help() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for each in (parser, *commands.choices.values()):
        for action in each._actions:
            if action is not commands:
                assert action.help, (each.prog, action.dest)
                assert action.help != argparse.SUPPRESS, (each.prog, action.dest)
    assert "binary" in run("alloc", "--help").stdout


# -- watch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("watch", "--timeout", "1"), ("--json", "watch", "--timeout", "1"), ("--timeout", "1", "watch", "--no-existing")],
)
def test_watch_ends_after_timeout_with_no_events(daemon: RunningDaemon, args: tuple[str, ...]) -> None:
    started = time.monotonic()
    result = ctl(daemon, *args)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 2.5
    if "--json" in args:
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["event"] for line in lines] == ["added", "synced"]
        for line in lines:
            assert_schema(line, heaps.WATCH_EVENT)
        assert lines[0]["heap"]["name"] == "memfd"
        assert lines[1]["heap"] is None


def test_watch_count(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "--json", "watch", "--count", "1")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["event"] == "added"


def test_watch_exits_0_on_ctrl_c(daemon: RunningDaemon) -> None:
    watcher = subprocess.Popen(
        [*CTL, "--runtime-dir", str(daemon.runtime_dir), "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    assert "memfd" in watcher.stdout.readline()
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=10) == 0


# -- exit codes and hints --------------------------------------------------------------


def test_no_daemon_exits_3_with_a_hint(tmp_path: Path) -> None:
    human = run("--runtime-dir", str(tmp_path), "heaps", timeout=30)
    assert human.returncode == 3
    assert "is dmabufd running?" in human.stderr
    assert "make run" in human.stderr
    assert "DMABUFD_RUNTIME_DIR" in human.stderr
    machine = run("heaps", "--json", "--runtime-dir", str(tmp_path), timeout=30)
    assert machine.returncode == 3
    error = json.loads(machine.stdout)
    assert error["error"] == "UNAVAILABLE"
    assert error["exit_code"] == 3
    assert "make run" in error["hint"]


def test_stale_socket_exits_3(tmp_path: Path) -> None:
    """Socket files a dead daemon left behind: nobody listens."""
    for name in (FD_SOCKET_NAME, CONTROL_SOCKET_NAME):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(str(tmp_path / name))
    result = run("--runtime-dir", str(tmp_path), "heaps", timeout=30)
    assert result.returncode == 3
    assert "is dmabufd running?" in result.stderr


def test_unknown_heap_exits_4(daemon: RunningDaemon) -> None:
    human = ctl(daemon, "alloc", "--size", "4K", "--heap", "nope")
    assert human.returncode == 4
    assert "NOT_FOUND" in human.stderr
    assert "no heap named 'nope'" in human.stderr
    machine = ctl(daemon, "--json", "alloc", "--size", "4K", "--heap", "nope")
    assert machine.returncode == 4
    assert json.loads(machine.stdout)["error"] == "NOT_FOUND"


@pytest.mark.parametrize("size", ["four megabytes", "-4K", "4X", "1.5"])
def test_bad_size_exits_2(daemon: RunningDaemon, size: str) -> None:
    result = ctl(daemon, "alloc", "--size", size)
    assert result.returncode == 2
    assert "size" in result.stderr


@pytest.mark.parametrize(("size", "instead"), [("4MB", "4M or 4MiB"), ("1GB", "1G or 1GiB"), ("16kb", "16K or 16KiB")])
def test_decimal_size_units_are_refused(daemon: RunningDaemon, size: str, instead: str) -> None:
    result = ctl(daemon, "alloc", "--size", size)
    assert result.returncode == 2
    assert "ambiguous" in result.stderr
    assert instead in result.stderr
    with daemon.connect() as client:
        assert client.stats().allocations == 0


def test_usage_errors_are_json_under_json(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "--json", "alloc", "--size", "4MB")
    assert result.returncode == 2
    error = json.loads(result.stdout)
    assert error["error"] == "INVALID_ARGUMENT"
    assert error["exit_code"] == 2
    assert "4M or 4MiB" in error["message"]
    assert run("no-such-command").returncode == 2
    assert run("watch", "--timeout", "0").returncode == 2  # a timeout of 0 would make sockets non-blocking


def test_permission_denied_exits_5(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(f"[heaps.access.memfd]\nuids = [{ROOTLESS_UID}]\n")
    result = ctl(daemon, "alloc", "--size", "4K", "--heap", "memfd")
    assert result.returncode == 5
    assert "may not allocate from heap 'memfd'" in result.stderr
    assert "hint:" in result.stderr
    assert "dmabufctl heaps" in result.stderr
    assert json.loads(ctl(daemon, "--json", "alloc", "--size", "4K").stdout)["exit_code"] == 5


def test_quota_exits_6(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "4K"\n')
    result = ctl(daemon, "alloc", "--size", "8K")
    assert result.returncode == 6
    assert "RESOURCE_EXHAUSTED" in result.stderr
    assert "quota" in result.stderr
    assert "dmabufctl stats" in result.stderr
    assert ctl(daemon, "alloc", "--size", "4K").returncode == 0


def test_exit_codes_are_in_help() -> None:
    shown = run("--help").stdout
    for row in EXIT_CODES:
        assert f"{row.code.value:>3}  {row.meaning}" in shown
    assert "exit codes: 0 ok" in run("alloc", "--help").stdout


# -- load: local problems first ---------------------------------------------------------


def test_load_fifo_is_refused_at_once(daemon: RunningDaemon, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = ctl(daemon, "load", str(fifo))
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert "FIFO" in result.stderr
    assert "regular file" in result.stderr
    with daemon.connect() as client:
        assert client.stats().sessions_opened == 1, "the daemon was never asked"
    assert ctl(daemon, "load", str(fifo), "--by-path").returncode == 2


def test_load_directory_and_missing_file(daemon: RunningDaemon, tmp_path: Path) -> None:
    directory = ctl(daemon, "load", str(tmp_path))
    assert directory.returncode == 2
    assert "is a directory" in directory.stderr
    missing = ctl(daemon, "--json", "load", str(tmp_path / "missing.bin"))
    assert missing.returncode == 4
    assert json.loads(missing.stdout)["message"].endswith("no such file")


def test_load_range_past_the_end_exits_2(daemon: RunningDaemon, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 4096)
    result = ctl(daemon, "load", str(data), "--offset", "8K")
    assert result.returncode == 2
    assert "past its end" in result.stderr


def test_load_json(daemon: RunningDaemon, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 << 20))
    result = ctl_json(daemon, "load", str(data), "--verify", "--max-buffer", "1M")
    assert_schema(result, load.LOAD)
    assert result["bytes"] == 3 << 20
    assert result["verified"] is True
    assert [b["size"] for b in result["buffers"]] == [1 << 20] * 3
    assert_schema(result["segments"][0], load.SEGMENT)
    assert isinstance(result["mb_per_s"], float)
    assert result["schema_version"] == SCHEMA_VERSION
    assert ctl(daemon, "load", str(data)).stderr == "", "no progress bar when stderr is not a terminal"


# -- buffers and dump -------------------------------------------------------------------


def test_buffers_lists_the_callers_own_session(daemon: RunningDaemon) -> None:
    result = ctl_json(daemon, "buffers")
    assert_schema(result, buffers.BUFFERS)
    assert result["buffers"] == []
    assert isinstance(result["session_id"], int)
    text = ctl(daemon, "buffers")
    assert text.returncode == 0
    assert "holds no buffers" in text.stdout
    assert "dmabufctl dump" in text.stdout


def test_dump_shows_every_client_per_process(daemon: RunningDaemon, client: dmabufd_client.Client) -> None:
    held = client.allocate_batch("64K", 2, name="dumped")
    try:
        result = ctl_json(daemon, "dump")
        assert_schema(result, dump.DUMP)
        assert_numbers(result)
        assert result["all_clients"] is True
        (me,) = [p for p in result["processes"] if p["pid"] == os.getpid()]
        assert_schema(me, dump.DUMP_PROCESS)
        assert me["session_ids"] == [client.session_id]
        assert me["readable"] is True
        rows = {b["inode"]: b for b in me["buffers"]}
        for buffer in held:
            row = rows[buffer.info.inode]
            assert_schema(row, dump.DUMP_BUFFER)
            assert row == {
                "name": buffer.info.kernel_name,
                "size": 64 << 10,
                "inode": buffer.info.inode,
                "exporter": "memfd",
            }
        assert (me["booked_buffers"], me["booked_bytes"], me["booked_open_buffers"]) == (2, 128 << 10, 2)
        assert result["booked_buffers"] == 2
        assert result["total_bytes"] >= 128 << 10
        assert all(p["session_ids"] != [] for p in result["processes"])

        text = ctl(daemon, "dump")
        assert text.returncode == 0, text.stderr
        assert f":{os.getpid()} (uid {os.getuid()}, session {client.session_id})" in text.stdout
        assert "Name" in text.stdout
        assert "Ino" in text.stdout
        assert "Exporter" in text.stdout
        assert "PROCESS TOTAL" in text.stdout
        assert "dmabuf total:" in text.stdout
        assert held[0].info.kernel_name in text.stdout

        csv = ctl(daemon, "dump", "--csv")
        assert csv.returncode == 0, csv.stderr
        lines = [line.split(",") for line in csv.stdout.splitlines()]
        assert lines[0] == list(dump.CSV_COLUMNS)
        mine = [line for line in lines if line[0] == "buffer" and line[1] == str(os.getpid())]
        assert {int(line[6]) for line in mine} >= {b.info.inode for b in held}
        assert lines[-1][0] == "total"
        assert lines[-1][4] == "TOTAL"
        assert ctl(daemon, "dump", "--csv", "--json").returncode == 2
    finally:
        for buffer in held:
            buffer.close()


# -- for people ---------------------------------------------------------------------------


def test_tables_for_people(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "stats")
    assert result.returncode == 0, result.stderr
    assert "clients" in result.stdout
    assert "total" in result.stdout
    assert "(this run)" in result.stdout
    assert "4 GiB" in result.stdout  # binary units in tables


def test_completion_script_is_bash(tmp_path: Path) -> None:
    result = run("completion", "bash")
    assert result.returncode == 0
    script = tmp_path / "dmabufctl.bash"
    script.write_text(result.stdout)
    probe = (
        f"source {script}; COMP_WORDS=(dmabufctl load --method d); COMP_CWORD=3; _dmabufctl; "
        'echo "${COMPREPLY[@]}"; COMP_WORDS=(dmabufctl du); COMP_CWORD=1; _dmabufctl; echo "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert completed.stdout.splitlines() == ["direct-cfr direct-read", "dump"]


def test_stats_json_covers_every_field_of_the_api() -> None:
    """A field added to Stats or ClientStats must reach the JSON (and its docs)."""
    assert set(keys(stats.STATS)) - {"schema_version"} == {f.name for f in pb.Stats.DESCRIPTOR.fields}
    assert set(keys(stats.CLIENT)) == {f.name for f in pb.ClientStats.DESCRIPTOR.fields}
    assert set(keys(stats.HEAP_USAGE)) == {f.name for f in pb.HeapStats.DESCRIPTOR.fields}
    assert set(keys(BUFFER)) == {f.name for f in pb.BufferInfo.DESCRIPTOR.fields}


def test_bench_on_chosen_cpus_reports_how_idle_the_machine_was(daemon: RunningDaemon) -> None:
    small = ("--iterations", "20", "--clients", "2", "--seconds", "0.3")
    result = ctl_json(daemon, "bench", *small, "--cpus", "0", "--daemon-pid", str(daemon.pid))
    assert result["cpus"] == [0]
    assert result["allocs_per_s_1_client"] > 0
    assert result["allocs_per_s_n_clients"] > 0
    for key in ("cpu_idle_1_client", "cpu_idle_n_clients"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    # The daemon's loop served every allocation, so it was on a CPU for
    # part of each run; its two shares are of one wall time (a small slack
    # for the clock reads around the kernel's counters).
    for clients in ("1_client", "n_clients"):
        on_cpu, waiting = result[f"daemon_loop_on_cpu_{clients}"], result[f"daemon_loop_waiting_{clients}"]
        assert 0.0 < on_cpu <= 1.05, (clients, on_cpu)
        assert waiting >= 0.0, (clients, waiting)
        assert on_cpu + waiting <= 1.05, (clients, on_cpu, waiting)
    with open("/proc/sys/kernel/pid_max") as pid_max:  # no process has this pid
        no_such_pid = pid_max.read().strip()
    nobody = ctl(daemon, "bench", *small, "--daemon-pid", no_such_pid)
    assert nobody.returncode == Exit.INVALID_INPUT
    assert f"--daemon-pid: cannot read the scheduler statistics of process {no_such_pid}" in nobody.stderr
    refused = ctl(daemon, "bench", "--cpus", "2-1")
    assert refused.returncode == Exit.INVALID_INPUT
    assert "not a CPU list" in refused.stderr
    absent = ctl(daemon, "bench", "--cpus", str(os.cpu_count() or 1))
    assert absent.returncode == Exit.INVALID_INPUT
    assert "cannot run on CPUs" in absent.stderr
    assert "usable: " in absent.stderr


def test_cpu_lists_are_read_as_taskset_writes_them() -> None:
    assert parse_cpus("1") == {1}
    assert parse_cpus("0,2-3") == {0, 2, 3}
    for bad in ("", "a", "3-1", "-1", "1,,2"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpus(bad)
