"""Start Flower's simulation runtime on loopback, run the app with ``flwr run``, stop it.

We start our own ``flower-superlink --simulation`` on a free 127.0.0.1 port (rather
than letting ``flwr run`` start a detached one on fixed ports) so that we hold its
PID and stop it, with the Ray cluster and app processes under it, when done.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import torch

from common.operator_logging import CLIENT_LOG_LEVEL_ENV
from common.processes import (
    flower_bin,
    flower_env,
    free_port,
    stop_process_tree,
    wait_until_listening,
)

RAY_DIR_PREFIX = "fedrlhf-ray-"
MAX_ACTORS = 8
"""Ray actors (processes, each with its own copy of the base) on a machine with fewer
cores than this: more actors than cores let a round's clients all train at once."""


def ray_cpus(clients: int, cores: int) -> int:
    """CPUs Ray is told it has, at one CPU per virtual client: ``min(clients,
    max(cores, MAX_ACTORS))`` actors. One actor per core would run 5 clients on 2 cores
    in three waves, the last with one core idle; five actors time-share the two cores
    and finish together. (Flower takes whole CPUs per client only.)"""
    return max(1, min(clients, max(cores, MAX_ACTORS)))


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` on 127.0.0.1, stopped by PID on exit."""

    def __init__(self, home: Path, log_file: Path) -> None:
        self.home = home
        self.ray_dir = Path(tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir="/tmp"))
        self.env = {**flower_env(home, self.ray_dir), CLIENT_LOG_LEVEL_ENV: "WARNING"}
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
                flower_bin("flower-superlink"),
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
        wait_until_listening(self.process, "127.0.0.1", self.port, self.log_file)
        return self

    def run(
        self, app_dir: Path, run_config_file: Path, num_supernodes: int, log_file: Path
    ) -> subprocess.Popen[bytes]:
        """``flwr run APP sim --stream`` in the background; output goes to ``log_file``."""
        cpus = ray_cpus(num_supernodes, os.cpu_count() or 1)
        federation = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1 init-args-num-cpus={cpus}"
        )
        gpus = torch.cuda.device_count()
        if gpus:
            # Ray hides GPUs from actors that ask for none (CUDA_VISIBLE_DEVICES=""), which
            # would put model.device=auto on the CPU: give each virtual client a share.
            federation += f" client-resources-num-gpus={min(1.0, gpus / num_supernodes):.4f}"
        log = log_file.open("ab")
        return subprocess.Popen(
            [
                flower_bin("flwr"),
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
            stop_process_tree(self.process)
        shutil.rmtree(self.ray_dir, ignore_errors=True)
