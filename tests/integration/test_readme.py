"""The README's examples run as written, on a machine with the memfd heap
only: the client API section's code, and every dmabufctl command its
dmabufctl section shows. Its exit code table is the one dmabufctl uses."""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dmabufd_client.cli.exits import EXIT_CODES
from tests.conftest import RunningDaemon

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_DMABUFCTL = ".venv/bin/dmabufctl"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def dmabufctl_commands() -> list[list[str]]:
    """The arguments of every dmabufctl invocation the section's shell
    block shows (comments dropped), in order."""
    (shell,) = blocks(section("dmabufctl"), "sh")
    commands = []
    for line in shell.splitlines():
        for invocation in re.findall(rf"{re.escape(VENV_DMABUFCTL)}([^)#]*)", line):
            commands.append(shlex.split(invocation))
    return commands


def dmabufctl() -> list[str]:
    script = ROOT / VENV_DMABUFCTL
    return [str(script)] if script.exists() else [sys.executable, "-m", "dmabufd_client.ctl"]


def test_readme_client_example_runs(daemon: RunningDaemon) -> None:
    (example,) = blocks(section("The client API in ten lines"), "python")
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    with daemon.connect() as client:
        stats = client.stats()
        assert stats.allocations == 8
        assert stats.releases == 8


def _safetensors(path: Path, name: str) -> None:
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    header = json.dumps({name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_readme_client_fragments_run(daemon: RunningDaemon, tmp_path: Path) -> None:
    """The fragments after the example (files, models, camera pools) run
    inside a session, with the files they name."""
    fragments = blocks(section("The client API in ten lines"), "text")
    assert len(fragments) == 2
    (tmp_path / "weights.bin").write_bytes(os.urandom(1 << 20))
    _safetensors(tmp_path / "model.safetensors", "embeddings.word_embeddings.weight")
    body = "\n".join(textwrap.indent(fragment, "    ") for fragment in fragments)
    script = f"import dmabufd_client\nwith dmabufd_client.connect() as client:\n{body}"
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "MB/s" in result.stdout


def test_readme_shows_every_new_command() -> None:
    shown = {command[0] for command in dmabufctl_commands() if command}
    assert shown >= {"heaps", "alloc", "stats", "dump", "buffers", "watch", "load", "bench", "completion"}


@pytest.mark.parametrize("command", dmabufctl_commands(), ids=shlex.join)
def test_readme_dmabufctl_command_succeeds(daemon: RunningDaemon, tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "model.bin").write_bytes(os.urandom(4 << 20))  # what `load model.bin` loads
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [*dmabufctl(), *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    if "--json" in command:
        assert json.loads(result.stdout)["schema_version"] == 1
    if command[0] == "completion":
        subprocess.run(["bash", "-n"], input=result.stdout, text=True, check=True)


def test_readme_names_no_heap_this_machine_lacks_without_saying_so() -> None:
    for title in ("dmabufctl", "The client API in ten lines"):
        for code in blocks(section(title), "sh") + blocks(section(title), "python") + blocks(section(title), "text"):
            assert not re.search(r"""heap[= ]["']?(system|udmabuf|cma)""", code), (title, code)


def test_readme_exit_codes_are_dmabufctls() -> None:
    rows = [line.strip("|").split("|") for line in section("dmabufctl").splitlines() if re.match(r"\| \d+ \|", line)]
    documented = [(int(code), meaning.strip(), status.strip()) for code, meaning, status in rows]
    actual = [(row.code.value, row.meaning, ", ".join(s.name for s in row.statuses)) for row in EXIT_CODES]
    assert documented == actual
