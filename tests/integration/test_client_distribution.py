"""The client library as an application gets it: `pip install` of the
dmabufd-client distribution (with dmabufd-common, the one it needs) into a
fresh venv, with neither the daemon nor its dependencies, then a script in
that venv that allocates and maps a buffer against a real daemon.

The venv is made once for the module (about 15 s: a venv, pip, two wheel
builds and grpcio, protobuf and numpy; pinned by constraints.txt)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningDaemon

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"
# What the daemon needs and an application must not get with the client.
DAEMON_ONLY = ("dmabufd", "pyudev", "prometheus-client", "grpcio-reflection")
# Not needed by the library: dmabufctl's extra [cli], and the ML example's torch.
NOT_WANTED = ("rich", "torch")
INSTALL_TIMEOUT_S = 600

CLIENT_SCRIPT = """
import importlib.util, json, sys
import dmabufd_client
from dmabufd_client import Access

with dmabufd_client.connect(sys.argv[1]) as client:
    buffer = client.allocate("1M", name="client-distribution")
    with buffer.map(Access.RW) as mapping:
        mapping.numpy()[:4] = [1, 2, 3, 4]
    with buffer.map(Access.READ) as mapping:
        head = mapping.numpy()[:4].tolist()
    size = buffer.size
    buffer.close()
print(json.dumps({
    "head": head,
    "size": size,
    "client": dmabufd_client.__file__,
    "pyudev": importlib.util.find_spec("pyudev") is not None,
    "daemon": importlib.util.find_spec("dmabufd") is not None,
}))
"""


@dataclass(frozen=True)
class ClientVenv:
    python: Path
    distributions: dict[str, str]  # name (normalised) -> version, from pip list


def _clean_env() -> dict[str, str]:
    """The caller's environment without what would point Python at the dev venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(argv: list[str | Path], cwd: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> str:
    command = [str(a) for a in argv]
    env = _clean_env()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    work = tmp_path_factory.mktemp("client-distribution")
    # Build from copies: a build in the checkout would leave build/ trees there
    # (which mypy would then find twice). copytree follows the LICENSE links.
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "examples")
    sources = [shutil.copytree(REPO / name, work / "src" / name, ignore=ignore) for name in ("common", "clients")]
    venv = work / "venv"
    # A venv made from inside the dev venv uses the same base interpreter.
    _run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--constraint", CONSTRAINTS, *sources], cwd=work)
    listed = json.loads(_run([python, "-m", "pip", "list", "--format=json"], cwd=work))
    distributions = {d["name"].lower().replace("_", "-"): d["version"] for d in listed}
    return ClientVenv(python, distributions)


def test_the_client_distribution_brings_no_daemon(client_venv: ClientVenv) -> None:
    installed = client_venv.distributions
    assert installed["dmabufd-client"] == installed["dmabufd-common"] == "0.1.0"
    for name in ("grpcio", "grpcio-health-checking", "grpcio-status", "protobuf", "numpy"):
        assert name in installed, (name, sorted(installed))
    assert [name for name in (*DAEMON_ONLY, *NOT_WANTED) if name in installed] == []
    # The installed packages are typed (PEP 561), the generated stubs with them.
    check = (
        "import importlib.resources as r\n"
        "for package in ('dmabufd_client', 'dmabufd_camera', 'dmabufd_common'):\n"
        "    assert r.files(package).joinpath('py.typed').is_file(), package\n"
        "assert r.files('dmabufd_common.api.v1').joinpath('dmabufd_pb2.pyi').is_file()\n"
    )
    _run([client_venv.python, "-I", "-c", check], cwd=client_venv.python.parent)


def test_a_client_script_allocates_and_maps_a_buffer(
    daemon: RunningDaemon, client_venv: ClientVenv, tmp_path: Path
) -> None:
    out = _run([client_venv.python, "-I", "-c", CLIENT_SCRIPT, daemon.runtime_dir], cwd=tmp_path, timeout_s=60)
    report = json.loads(out.splitlines()[-1])
    assert report["head"] == [1, 2, 3, 4]
    assert report["size"] >= 1 << 20
    assert Path(report["client"]).is_relative_to(client_venv.python.parents[1])  # the venv's copy, not the repo's
    assert report["pyudev"] is False
    assert report["daemon"] is False
    with daemon.connect() as client:
        stats = client.stats()
        assert (stats.allocations, stats.releases) == (1, 1)
