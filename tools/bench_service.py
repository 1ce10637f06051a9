#!/usr/bin/env python3
"""Start a private dmabufd, run `dmabufctl bench` against it, stop it.

    python tools/bench_service.py [--json] [--daemon-cpus LIST] [--call-cpus LIST]
                                  [--own-session] [dmabufctl bench options...]

--daemon-cpus keeps the whole daemon on those CPUs; with `--cpus` (dmabufctl
bench's) naming the others, the clients never share its core. --call-cpus
sets the daemon's `[scheduling] call_cpus`: its event loop and call threads
are pinned, the clients and the daemon's other threads go where the kernel
puts them. The daemon's pid goes to `dmabufctl bench --daemon-pid`, which
then reports where its event loop spent each throughput run.

--own-session starts the daemon in a session of its own, as init and
systemd start services. Where the kernel has autogroup on
(/proc/sys/kernel/sched_autogroup_enabled), a session is a scheduling group
of its own, as a service's cpu cgroup is: the clients then wake up in
another group than the daemon's (bench/README.md, "Allocation", measures
both layouts).

The figures come from one run on one machine: compare ratios, not the
absolute microseconds, across machines.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmabufd_client.cli.output import cpus
from dmabufd_client.ctl import main as dmabufctl
from dmabufd_common.cpus import format_cpus
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", type=Path, help="daemon config (default: built-in)")
    parser.add_argument("--daemon-cpus", type=cpus, metavar="LIST", help="run the daemon on these CPUs only")
    parser.add_argument("--call-cpus", type=cpus, metavar="LIST", help="the daemon's [scheduling] call_cpus")
    parser.add_argument("--own-session", action="store_true", help="start the daemon in a session of its own")
    args, bench_args = parser.parse_known_args()
    if args.config and args.call_cpus is not None:
        parser.error("--call-cpus and --config: set [scheduling] call_cpus in that file instead")
    with tempfile.TemporaryDirectory(prefix="dmabufd-bench-") as tmp:
        runtime = Path(tmp) / "rt"
        command = [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime), "--log-level", "warning"]
        config = args.config
        if args.call_cpus is not None:
            config = Path(tmp) / "dmabufd.toml"
            config.write_text(f'[scheduling]\ncall_cpus = "{format_cpus(args.call_cpus)}"\n')
        if config:
            command += ["--config", str(config)]
        daemon = subprocess.Popen(command, start_new_session=args.own_session)
        try:
            if args.daemon_cpus is not None:
                try:  # set while it still imports, before any thread of its starts
                    os.sched_setaffinity(daemon.pid, args.daemon_cpus)
                except OSError as error:
                    usable = format_cpus(os.sched_getaffinity(0))
                    print(f"--daemon-cpus: {error.strerror}; usable CPUs: {usable}", file=sys.stderr)
                    return 2
            deadline = time.monotonic() + 20
            while not (runtime / CONTROL_SOCKET_NAME).exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("dmabufd did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            time.sleep(0.2)
            session = "its own" if os.getsid(daemon.pid) == daemon.pid else "this script's"
            print(f"dmabufd (pid {daemon.pid}) runs in {session} session", file=sys.stderr)
            ctl_args = ["--runtime-dir", str(runtime)] + (["--json"] if args.json else [])
            ctl_args += ["bench", "--daemon-pid", str(daemon.pid), *bench_args]
            return dmabufctl(ctl_args)
        finally:
            daemon.terminate()
            daemon.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
