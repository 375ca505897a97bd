"""Start Flower's simulation runtime on loopback, run the app with ``flwr run``, stop it.

We start our own ``flower-superlink --simulation`` on a free 127.0.0.1 port (rather
than letting ``flwr run`` start a detached one on fixed ports) so that we hold its
PID and stop it, with the Ray cluster and app processes under it, when done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

PROJECT_DIR = Path(__file__).resolve().parent.parent
"""The Flower app (pyproject.toml with [tool.flwr.app]) that ``flwr run`` submits."""


RAY_DIR_PREFIX = "fedrlhf-ray-"


def flower_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for every Flower process we start: quiet, offline, on loopback.

    ``ray_tmp`` must be a short path: Ray puts Unix sockets in it (107-byte limit).
    """
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The SuperLink starts `flower-superexec` by name: our environment's bin first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keeps every Ray port on 127.0.0.1
        RAY_TMPDIR=str(ray_tmp),
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_run_config(path: Path, overrides: Mapping[str, bool | int | float | str]) -> Path:
    """Run-config overrides as a TOML file (safe for paths with spaces)."""
    path.write_text("".join(f"{key} = {_toml_value(v)}\n" for key, v in overrides.items()))
    return path


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` on 127.0.0.1, stopped by PID on exit."""

    def __init__(self, home: Path, log_file: Path) -> None:
        self.home = home
        self.ray_dir = Path(tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir="/tmp"))
        self.env = flower_env(home, self.ray_dir)
        self.port = free_port()
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SimulationSuperLink:
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "{self.address}"\ninsecure = true\n'
        )
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [
                _bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.home / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_until_listening()
        return self

    def _wait_until_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {self.process.returncode}; see {self.log_file}"
                )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not listen on {self.address} within {timeout} s")

    def run(
        self, app_dir: Path, run_config_file: Path, num_supernodes: int, log_file: Path
    ) -> subprocess.Popen[bytes]:
        """``flwr run APP sim --stream`` in the background; output goes to ``log_file``."""
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
        log = log_file.open("ab")
        return subprocess.Popen(
            [
                _bin("flwr"),
                "run",
                str(app_dir),
                "sim",
                "--stream",
                "--run-config",
                str(run_config_file),
                "--federation-config",
                federation,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop the process and everything below it, by PID: SIGTERM, then SIGKILL.

    Flower starts some helpers (SuperExec, Ray) in sessions of their own, so the
    process tree is walked rather than trusting the process group alone.
    """
    tree = descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    for pid in [process.pid, *tree, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
