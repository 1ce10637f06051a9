"""bench.compare on tiny files (8 MiB, one round, fio included): the JSON shape, and every row
either ran or was skipped with a reason. A smoke test, not a timed assertion.

The benchmark installs fio itself when it is missing (apt-get, as root); where it cannot, it
exits 2 naming the install command: skipped here, but under CI (CI=true) that is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors

from bench import compare, fio
from bench.modelfile import write_model
from tools.vm.dmabufd_vm import MissingDependenciesError

REPO = Path(__file__).resolve().parents[2]
SIZE = 8 << 20
ARGS = ("--size", "8M", "--model-size", "8M", "--block", "2M", "--fio-depths", "1,8", "--repeat", "1", "--json")
FILE_ROWS = {"fio-d8", "loadfile", "loadfile-reserve", "raw-reused", "raw-fresh", "fio-d1"}
MODEL_ROWS = {
    f"{key}-{state}"
    for state in ("cold", "warm")
    for key in ("st-load-file", "loadmodel", "safe-open", "loadfile-model")
} | {"loadmodel-second"}
DMABUFD_ROWS = {"loadfile", "loadfile-reserve", "loadmodel-cold", "loadmodel-second", "loadmodel-warm"} | {
    f"loadfile-model-{state}" for state in ("cold", "warm")
}
SPREAD_KEYS = {"median", "min", "max"}
ROW_KEYS = {"key", "label", "group", "reference", "status", "reason", "methods", "wall_s", "gb_s", "cpu_s_per_gib"}
ROW_KEYS |= {"daemon_cpu_s_per_gib", "ratio", "passes"}
PASS_KEYS = {"round", "wall_s", "cpu_s", "bytes", "gb_s", "cpu_s_per_gib", "ratio", "extra"}


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def run_compare(tmp_path: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", *ARGS, "--dir", str(tmp_path), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # a missing fio is installed first: apt-get update and install
        check=False,
    )
    if result.returncode == 2 and shutil.which("fio") is None and "--no-fio" not in extra:
        if under_ci():
            pytest.fail(f"fio is missing and could not be installed under CI: {result.stderr}", pytrace=False)
        pytest.skip(f"fio is missing and cannot be installed here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # the test files are gone
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def check_row(row: dict[str, Any]) -> None:
    assert set(row) >= ROW_KEYS, row
    assert row["status"] in ("ok", "skipped"), row
    if row["status"] == "skipped":
        assert row["reason"], row
        assert row["passes"] == []
        return
    assert len(row["passes"]) == 1, row
    for name in ("wall_s", "gb_s", "cpu_s_per_gib"):
        assert set(row[name]) == SPREAD_KEYS, row
    one = row["passes"][0]
    assert set(one) >= PASS_KEYS
    assert one["round"] == 0
    assert one["bytes"] >= SIZE
    assert min(one["wall_s"], one["gb_s"]) > 0, row
    assert one["cpu_s"] >= 0, row
    if row["reference"] is None:
        assert one["ratio"] is None
    else:
        assert one["ratio"] > 0, row


@pytest.mark.timeout(1200)
def test_every_row_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_compare(tmp_path)
    assert report["tool"] == "bench.compare"
    assert report["schema_version"] == 1
    assert report["options"]["size"] == SIZE
    assert report["options"]["repeat"] == 1
    assert report["cache"]["cold"]
    assert report["cache"]["warm"]
    assert report["fio"]["engine"] in fio.ENGINES
    assert report["files"]["raw"]["size"] == SIZE
    model = report["files"]["model"]
    assert model["tensors"] > 100  # many tensors, as real checkpoints have
    assert set(model["dtypes"]) >= {"F16", "F32"}
    assert set(report["machine"]["before"]) >= {"loadavg", "qemu_processes"}
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == FILE_ROWS | MODEL_ROWS
    for row in rows.values():
        check_row(row)
    # fio ran (the test command installs it), and so did every row that needs nothing more.
    for key in FILE_ROWS | DMABUFD_ROWS:
        assert rows[key]["status"] == "ok", rows[key]
    assert rows["fio-d8"]["daemon_cpu_s_per_gib"] is None
    for key in ("fio-d8", "st-load-file-cold", "st-load-file-warm"):
        assert rows[key]["reference"] is None
    assert rows["loadmodel-second"]["reference"] == "loadmodel-cold"
    for key in DMABUFD_ROWS:
        extra = rows[key]["passes"][0]["extra"]
        assert extra["method"], extra  # what the daemon says it did
        assert rows[key]["methods"] == [extra["method"]]
        assert extra["daemon_cpu_s"] is not None
        assert rows[key]["daemon_cpu_s_per_gib"]["median"] >= 0
        assert extra["samples_checked"] > 0
    assert rows["loadmodel-cold"]["passes"][0]["extra"]["shared"] is False
    assert rows["loadmodel-second"]["passes"][0]["extra"]["shared"] is True
    fio_extra = rows["fio-d8"]["passes"][0]["extra"]
    assert fio_extra["depth"] == 8
    assert "--direct=1" in fio_extra["command"]
    assert rows["raw-fresh"]["passes"][0]["extra"]["memory"] == "fresh"
    # The reserve row's load went into prepared memory, the plain one's not.
    assert rows["loadfile-reserve"]["passes"][0]["extra"]["reported"]["prepared_bytes"] == SIZE
    assert rows["loadfile"]["passes"][0]["extra"]["reported"]["prepared_bytes"] == 0
    summary = report["summary"]
    assert summary["references"] == {
        "file": "fio-d8",
        "model-cold": "st-load-file-cold",
        "model-warm": "st-load-file-warm",
    }
    assert summary["fio_best"] in {"fio-d1", "fio-d8"}
    # The figures: LoadFile vs fio (depth 8 and the best depth, unless 8 is the best),
    # vs the raw reader, daemon CPU; LoadModel vs LoadFile, load_file and safe_open, cold and
    # warm; the second client vs the first.
    compared = {(item["subject"], item["baseline"], item["measure"]) for item in summary["comparisons"]}
    assert compared >= {
        ("loadfile", "fio-d8", "speed"),
        ("loadfile", "raw-fresh", "speed"),
        ("loadfile", "fio-d8", "daemon-cpu"),
        ("loadfile-reserve", "fio-d8", "speed"),
        ("loadfile-reserve", "loadfile", "speed"),
        ("loadmodel-cold", "loadfile-model-cold", "time"),
        ("loadmodel-warm", "loadfile-model-warm", "time"),
        ("loadmodel-cold", "st-load-file-cold", "speed"),
        ("loadmodel-warm", "st-load-file-warm", "speed"),
        ("loadmodel-cold", "safe-open-cold", "speed"),
        ("loadmodel-warm", "safe-open-warm", "speed"),
        ("loadmodel-second", "loadmodel-cold", "speed"),
    }
    if summary["fio_best"] != "fio-d8":
        assert ("loadfile", summary["fio_best"], "speed") in compared
    for item in summary["comparisons"]:
        assert item["rounds"] == 1, item
        assert set(item["value"]) == SPREAD_KEYS
        assert item["value"]["median"] > 0, item
    assert summary["cached_before"]["cold_max"] < 0.5  # drop_caches (or fadvise) did empty it
    assert summary["cached_before"]["warm_min"] > 0.5
    # The saved report prints again, as a table and as Markdown.
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    assert compare.main(["--render", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "dmabufd LoadFile" in table
    assert "== comparisons" in table
    assert compare.main(["--render", str(saved), "--markdown"]) == 0
    assert "| dmabufd LoadModel, every tensor an array |" in capsys.readouterr().out


def test_no_fio(tmp_path: Path) -> None:
    """--no-fio: the fio rows are skipped with the reason; the raw reader is the reference."""
    report = run_compare(tmp_path, "--groups", "file", "--no-fio")
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == FILE_ROWS
    for row in rows.values():
        check_row(row)
    for key in ("fio-d1", "fio-d8"):
        assert rows[key]["status"] == "skipped"
        assert rows[key]["reason"] == "--no-fio"
    assert rows["raw-reused"]["reference"] is None
    assert rows["loadfile"]["reference"] == "raw-reused"
    assert report["fio"] is None


def test_load_method(tmp_path: Path) -> None:
    """--load-method: the LoadFile row loads with that method, and says so."""
    report = run_compare(tmp_path, "--groups", "file", "--no-fio", "--load-method", "buffered-read")
    row = {row["key"]: row for row in report["rows"]}["loadfile"]
    check_row(row)
    assert row["label"] == "dmabufd LoadFile (buffered-read)"
    assert row["methods"] == ["buffered-read"]
    assert report["options"]["load_method"] == "buffered-read"
    reserved = {row["key"]: row for row in report["rows"]}["loadfile-reserve"]
    assert reserved["methods"] == ["buffered-read"]


def test_a_config_of_ones_own_skips_the_reserve_row(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """--config: the daemons run with it, and the row that needs a config of its own says why it
    did not run."""
    config = tmp_path_factory.mktemp("config") / "dmabufd.toml"
    config.write_text('[loading]\nparallelism = 4\nchunk_bytes = "1M"\n')
    report = run_compare(tmp_path, "--groups", "file", "--no-fio", "--config", str(config))
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["loadfile"]["status"] == "ok"
    assert rows["loadfile"]["passes"][0]["extra"]["reported"]["parallelism"] == 4
    assert rows["loadfile-reserve"]["status"] == "skipped"
    assert "--config" in rows["loadfile-reserve"]["reason"]


def test_model_file_is_safetensors(tmp_path: Path) -> None:
    """The generated model parses with the reference implementation, tensor for tensor."""
    model = write_model(tmp_path / "m.safetensors", 4 << 20)
    assert model.size == (tmp_path / "m.safetensors").stat().st_size
    with safetensors.safe_open(str(model.path), framework="numpy") as opened:
        names = set(opened.keys())
        for tensor in model.tensors[:5]:
            assert tuple(opened.get_slice(tensor.name).get_shape()) == tensor.shape
    assert names == {tensor.name for tensor in model.tensors}


@pytest.mark.parametrize(
    "argv",
    [["--size", "1000"], ["--block", "3K"], ["--fio-depths", "0,8"], ["--groups", "gpu"], ["--repeat", "0"]],
)
def test_rejects_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        compare.parser().parse_args(argv)


def test_install_fio_not_possible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fio and without a way to install it, the benchmark stops naming the command
    (ensure_dependencies' message), it does not run without its reference."""
    asked: list[list[str]] = []

    def refuse(log: object, packages: list[str]) -> None:
        asked.append(packages)
        raise MissingDependenciesError("missing host packages: fio\ninstall them as root: apt-get install -y fio")

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(fio, "ensure_dependencies", refuse)
    with pytest.raises(fio.FioMissing, match="apt-get install -y fio"):
        fio.install_fio()
    assert asked == [[fio.FIO_PACKAGE]]


def test_install_fio_present_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(log: object, packages: list[str]) -> None:
        raise AssertionError("fio is on PATH: nothing to install")

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/fio")
    monkeypatch.setattr(fio, "ensure_dependencies", forbidden)
    assert fio.install_fio() is False
