"""The server's run directory: one checkpoint per round, state, metrics.

Layout::

    run_dir/
      run_config.json             the flat run config of the run
      metrics.jsonl               one line per round (rewritten on resume)
      checkpoints/
        reward-round-0012/
          reward/                 PEFT save_pretrained layout + reward_head.safetensors
          server_optimizer.safetensors   server optimizer state per phase
          state.json              phase, rounds done, counters, beta, metrics history
        policy-round-0004/
          reward/                 the (frozen) reward model the policy rounds use
          policy/                 PEFT layout + value_head.safetensors
          ...
      LATEST                      name of the last complete checkpoint
      SERVER_ROUND                last round number sent (written before sending)

A checkpoint is written to a temporary folder and renamed, and LATEST is replaced
atomically afterwards, so a crash at any point leaves the previous checkpoint as
the one a restarted server resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.model import REWARD_ADAPTER, RewardModel
from common.policy_model import POLICY_ADAPTER, POLICY_PREFIX, VALUE_HEAD_FILE, PolicyModel

STATE_FILE = "state.json"
OPTIMIZER_FILE = "server_optimizer.safetensors"


@dataclass
class ServerState:
    phase: str = "reward"
    round: int = 0
    """Rounds of ``phase`` completed (0 = the initial model)."""
    server_round: int = 0
    """Run-wide counter of rounds sent, across phases and failed attempts."""
    run_key: str = ""
    """Random name of this run, fixed at its start: clients track rounds served per run."""
    seed: int = 0
    reward_evaluated: bool = False
    """The final reward model's evaluation round is done (the policy phase may start)."""
    kl_controller: dict[str, float] = field(default_factory=dict)
    """The KL controller's state (beta, target, horizon) after the last policy round."""
    policy_kl: float = 0.0
    """The global policy's KL to the reference as the trust region last measured it (the
    accepted candidate's, or its scaled-back step on the line to it; 0 for the fresh
    adapter, which is the reference)."""
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpoint:
    state: ServerState
    reward: dict[str, torch.Tensor]
    """The reward model's trainable tensors (``adapter.*``, ``head.*``)."""
    policy: dict[str, torch.Tensor] | None
    """The policy's (``adapter.*``, ``value.*``), from the policy phase on."""
    optimizers: dict[str, dict[str, torch.Tensor]]
    """Server optimizer state per phase."""


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_run_config(self, flat: dict[str, Any]) -> None:
        _atomic_write(self.path / "run_config.json", json.dumps(flat, indent=2, sort_keys=True))

    def latest(self) -> Path | None:
        pointer = self.path / "LATEST"
        if not pointer.exists():
            return None
        target = self.checkpoints / pointer.read_text().strip()
        return target if (target / STATE_FILE).exists() else None

    def save(
        self,
        state: ServerState,
        model: RewardModel,
        optimizers: dict[str, dict[str, torch.Tensor]],
        policy: PolicyModel | None = None,
    ) -> Path:
        name = f"{state.phase}-round-{state.round:04d}"
        final = self.checkpoints / name
        tmp = self.checkpoints / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        if policy is not None:
            policy.save_pretrained(tmp)
        flat = {
            f"{phase}/{k}": v.contiguous() for phase, o in optimizers.items() for k, v in o.items()
        }
        save_file(flat, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _atomic_write(self.path / "LATEST", name)
        self.write_metrics(state.history)
        return final

    def load(self, checkpoint: Path) -> Checkpoint:
        state = ServerState(**json.loads((checkpoint / STATE_FILE).read_text()))
        reward = _adapter_tensors(
            checkpoint / REWARD_ADAPTER, "adapter.", "head", "reward_head.safetensors"
        )
        policy_dir = checkpoint / POLICY_ADAPTER
        policy = (
            _adapter_tensors(policy_dir, POLICY_PREFIX, "value", VALUE_HEAD_FILE)
            if policy_dir.exists()
            else None
        )
        optimizers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(checkpoint / OPTIMIZER_FILE)).items():
            phase, name = key.split("/", 1)
            optimizers.setdefault(phase, {})[name] = tensor
        return Checkpoint(state, reward, policy, optimizers)

    def reserve_server_round(self, server_round: int) -> None:
        """Persist a round number before it is sent, so a restarted server never reuses it."""
        _atomic_write(self.path / "SERVER_ROUND", str(server_round))

    def last_server_round(self) -> int:
        counter = self.path / "SERVER_ROUND"
        return int(counter.read_text()) if counter.exists() else 0

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        _atomic_write(self.metrics_file, "".join(json.dumps(h) + "\n" for h in history))


def _adapter_tensors(
    adapter_dir: Path, prefix: str, head: str, head_file: str
) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors under their wire names (``<prefix>*``, ``<head>.*``)."""
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors = {f"{prefix}{k}": v for k, v in adapter.items()}
    tensors.update({f"{head}.{k}": v for k, v in load_file(str(adapter_dir / head_file)).items()})
    return tensors


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably: a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
