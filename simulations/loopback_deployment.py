"""A real TLS federation on 127.0.0.1, set up with the operator's ``fedrlhf`` commands.

One SuperLink with TLS and SuperNode authentication and one registered SuperNode per
store, each a separate process tree that :meth:`Fleet.stop_all` stops by PID. The
deployment test and ``benchmarks/deployment_round.py`` run on it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import TracebackType

from common.processes import (
    descendants,
    flower_bin,
    free_port,
    stop_process_tree,
    wait_until_listening,
)

FEDRLHF = flower_bin("fedrlhf")


class Fleet:
    """Processes started here; all stopped by PID, with their descendants."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.seen_pids: set[int] = set()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log_file = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes.values():
            self.seen_pids |= {process.pid, *descendants(process.pid)}
        for process in reversed(list(self.processes.values())):
            stop_process_tree(process)


def fedrlhf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDRLHF, *args], capture_output=True, text=True, timeout=timeout, check=True
    )


class LoopbackDeployment:
    """CA, node keys, SuperLink and one authenticated SuperNode per store."""

    def __init__(self, work_dir: Path, stores: list[Path]) -> None:
        self.work_dir = work_dir
        self.stores = stores
        self.certs = work_dir / "certs"
        self.operator_home = work_dir / "operator"
        self.fleet = Fleet(work_dir / "logs")
        self.address = f"127.0.0.1:{free_port()}"

    def __enter__(self) -> LoopbackDeployment:
        try:
            self._start()
        except BaseException:
            self.fleet.stop_all()
            raise
        return self

    def _start(self) -> None:
        keys = self.work_dir / "keys"
        fedrlhf("create-ca", "--dir", str(self.certs), "--host", "127.0.0.1")
        port = int(self.address.rsplit(":", 1)[1])
        superlink = self.fleet.start(
            "superlink",
            [FEDRLHF, "superlink", "--certs", str(self.certs)]
            + ["--state", str(self.work_dir / "link"), "--host", "127.0.0.1", "--port", str(port)],
        )
        wait_until_listening(superlink, "127.0.0.1", port, self.fleet.logs / "superlink.log")
        for i, store in enumerate(self.stores):
            name = f"org-{i}"
            fedrlhf("create-node-key", "--out", str(keys / name), "--name", name)
            fedrlhf(
                "register-node", "--superlink", self.address, "--ca", str(self.ca),
                "--home", str(self.operator_home), "--key", str(keys / f"{name}.pub"),
                "--name", name,
            )  # fmt: skip
            self.fleet.start(
                name,
                [FEDRLHF, "supernode", "--superlink", self.address, "--ca", str(self.ca)]
                + ["--key", str(keys / name), "--store", str(store)]
                + ["--port", str(free_port()), "--home", str(self.work_dir / f"home-{name}")],
            )

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def launch_argv(self, settings: dict[str, bool | int | float | str]) -> list[str]:
        """``fedrlhf launch`` of a run with these run-config settings."""
        return (
            [FEDRLHF, "launch", "--superlink", self.address, "--ca", str(self.ca)]
            + ["--home", str(self.operator_home)]
            + [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.fleet.stop_all()
