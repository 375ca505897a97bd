"""Starting and stopping Flower's processes: environment, ports, process trees.

Shared by the simulation runner, the deployment commands and the tests. Every
process we start gets telemetry, update checks and runtime dependency installation
turned off, and is stopped by PID together with everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
"""The Flower app (pyproject.toml with [tool.flwr.app]) that ``flwr run`` submits: the
checkout this package runs from."""


SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.05"


def flower_env(home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """Environment for a Flower process: quiet, offline, its state under ``home``.

    ``ray_tmp`` (simulation only) must be a short path: Ray puts Unix sockets in it
    (107-byte limit).
    """
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-clientapp) by name: ours first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # A SuperNode's flower-superexec looks for messages to run every second by default;
    # each SecAgg+ round has four, so that is up to 4 s a round of waiting.
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
    if ray_tmp is not None:
        env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keeps every Ray port on 127.0.0.1
            RAY_TMPDIR=str(ray_tmp),
            RAY_DEDUP_LOGS="0",
        )
    return env


def flower_bin(name: str) -> str:
    """A console script of this environment (``flwr``, ``flower-superlink``, ...)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(
    process: subprocess.Popen[bytes], host: str, port: int, log_file: Path, timeout: float = 60.0
) -> None:
    """Return once ``host:port`` accepts connections; raise if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{Path(str(process.args[0])).name} exited with {process.returncode}; "
                f"see {log_file}"
            )
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout} s; see {log_file}")


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


def stop_process_tree(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop the process and everything below it, by PID: SIGTERM, then SIGKILL.

    Flower starts some helpers (SuperExec, Ray) in sessions of their own, so the
    process tree is walked rather than trusting the process group alone. Start the
    process with ``start_new_session=True``.
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
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_run_config(path: Path, overrides: Mapping[str, bool | int | float | str]) -> Path:
    """Run-config overrides as a TOML file for ``flwr run --run-config`` (safe for paths
    with spaces, which the ``key=value`` form is not)."""
    path.write_text("".join(f'"{key}" = {_toml_value(v)}\n' for key, v in overrides.items()))
    return path
