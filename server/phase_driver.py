"""The coordinator's loop: phases of rounds, each aggregated, checked, checkpointed.

Per round: sample clients, send the global adapter + head with the round
instruction, aggregate the replies (SecAgg+ unless explicitly off), refuse an
aggregate that fails the wire checks, apply the server optimizer, checkpoint, log.
Each training round's statistics describe the *incoming* model on the clients'
held-out comparisons; after the last round one evaluation-only round scores the
final model. A restarted server resumes after the last complete checkpoint.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid

from common.config import RunConfig
from common.model import RewardModel, build_reward_model, load_base
from common.protocol import RoundInstruction
from common.wire import (
    REWARD_STATS,
    TensorSpec,
    WireError,
    from_named_arrays,
    nbytes,
    spec_of,
    to_ndarrays,
    unpack_update,
)
from server.checkpoints import RunDirectory, ServerState
from server.rounds import RoundOutcome, run_plain_round, run_secure_round
from server.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_ROUND = 3


class RoundFailed(RuntimeError):
    pass


@dataclass
class PhaseDriver:
    grid: Grid
    context: Context
    config: RunConfig

    def __post_init__(self) -> None:
        self.run = RunDirectory(self.config.run_dir)
        base, _ = load_base(self.config.model.base, seed=self.config.seed)
        self.model: RewardModel = build_reward_model(base, self.config.model, seed=self.config.seed)
        self.spec: list[TensorSpec] = spec_of(self.model.trainable_state())
        self.weights = {k: v.detach().clone() for k, v in self.model.trainable_state().items()}
        self.optimizer = ServerOptimizer(self.config.server)
        self.state = ServerState(seed=self.config.seed)
        self.full_model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    # -- lifecycle ---------------------------------------------------------------------

    def run_all(self) -> ServerState:
        self._resume_or_start()
        if self.state.finished:
            log.info("run in %s already finished; nothing to do", self.run.path)
            return self.state
        self._wait_for_nodes()
        phase_rounds = self.config.reward.rounds
        while self.state.round < phase_rounds:
            self._train_round(self.state.round + 1, phase_rounds)
        self._final_evaluation(phase_rounds)
        self.state.finished = True
        self.run.save(self.state, self.model, self.optimizer.state_dict())
        log.info(
            "run finished: %d reward rounds; checkpoints in %s", phase_rounds, self.run.checkpoints
        )
        return self.state

    def _resume_or_start(self) -> None:
        self.run.write_run_config(self.config.to_flower())
        latest = self.run.latest()
        if latest is None:
            log.info("starting a new run in %s", self.run.path)
            self.state.run_key = secrets.token_hex(8)
            self.run.save(self.state, self.model, self.optimizer.state_dict())
            return
        state, tensors, optimizer_state = self.run.load(latest)
        self.weights = from_named_arrays(
            {k: v.numpy() for k, v in tensors.items()}, self.spec, f"checkpoint {latest}"
        )
        self.model.load_trainable_state(self.weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.state = state
        # Rounds sent after the checkpoint were numbered too: never reuse their numbers.
        self.state.server_round = max(state.server_round, self.run.last_server_round())
        self.run.write_metrics(state.history)  # drop lines of rounds after the checkpoint
        log.info("resuming from %s (%s round %d done)", latest.name, state.phase, state.round)

    def _wait_for_nodes(self) -> None:
        need = self.config.federation.min_clients
        deadline = time.monotonic() + self.config.federation.node_wait_timeout
        while len(list(self.grid.get_node_ids())) < need:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(list(self.grid.get_node_ids()))} of {need} clients connected "
                    f"within {self.config.federation.node_wait_timeout} s"
                )
            time.sleep(0.5)

    # -- rounds --------------------------------------------------------------------------

    def _sample(self, instruction: RoundInstruction) -> list[int]:
        """Clients for a round, seeded by its place in the run (phase, round, attempt), so
        a resumed run samples as an uninterrupted one would."""
        nodes = sorted(self.grid.get_node_ids())
        fed = self.config.federation
        count = min(len(nodes), max(fed.min_clients, round(fed.fraction_train * len(nodes))))
        where = f"{instruction.seed}/{instruction.phase}/{instruction.round}/{instruction.attempt}"
        return sorted(random.Random(where).sample(nodes, count))

    def _send(self, instruction: RoundInstruction, arrays: list[np.ndarray]) -> RoundOutcome:
        nodes = self._sample(instruction)
        fed = self.config.federation
        if fed.secure_aggregation:
            return run_secure_round(
                self.grid,
                self.context,
                nodes,
                instruction.to_config(),
                arrays,
                fed,
                instruction.server_round,
                reply_spec=self._reply_spec(instruction),
            )
        return run_plain_round(
            self.grid,
            nodes,
            instruction.to_config(),
            arrays,
            fed,
            instruction.server_round,
            validate=lambda reply, where: self._unpack(reply, instruction, where),
        )

    def _reply_spec(self, instruction: RoundInstruction) -> list[TensorSpec]:
        """The arrays a client's reply holds: the update (training only), then stats."""
        return [*(self.spec if instruction.task == "train" else []), REWARD_STATS.spec]

    def _unpack(self, arrays: list[np.ndarray], instruction: RoundInstruction, where: str):
        spec = self.spec if instruction.task == "train" else []
        return unpack_update(
            [np.asarray(a, dtype=np.float32) for a in arrays], spec, REWARD_STATS, where
        )

    def _attempt(
        self, task: str, round_: int, rounds: int
    ) -> tuple[RoundOutcome, dict, dict[str, float]]:
        """Send one round (retrying a failed one); returns outcome, update, stat sums."""
        for attempt in range(1, MAX_ATTEMPTS_PER_ROUND + 1):
            self.state.server_round += 1
            self.run.reserve_server_round(self.state.server_round)
            instruction = RoundInstruction(
                phase="reward",
                task=task,
                round=round_,
                rounds=rounds,
                attempt=attempt,
                server_round=self.state.server_round,
                run_key=self.state.run_key,
                seed=self.config.seed,
            )
            arrays = to_ndarrays(self.weights, self.spec)
            outcome = self._send(instruction, arrays)
            for d in outcome.dropouts:
                log.warning(
                    "reward round %d: node %d dropped at %s: %s",
                    round_,
                    d.node_id,
                    d.stage,
                    d.reason,
                )
            try:
                if outcome.mean is None:
                    raise RoundFailed("no aggregate (too few clients survived the round)")
                if len(outcome.survivors) < self.config.federation.min_clients:
                    raise RoundFailed(
                        f"{len(outcome.survivors)} survivors < federation.min-clients "
                        f"{self.config.federation.min_clients}"
                    )
                update, stats = self._unpack(
                    outcome.mean, instruction, f"aggregate of round {round_}"
                )
            except (RoundFailed, WireError) as exc:
                log.error("reward round %d attempt %d failed: %s", round_, attempt, exc)
                continue
            sums = {
                k: v * len(outcome.survivors) for k, v in REWARD_STATS.decode_sum(stats).items()
            }
            return outcome, update, sums
        raise RoundFailed(f"reward round {round_} failed {MAX_ATTEMPTS_PER_ROUND} times; stopping")

    def _train_round(self, round_: int, rounds: int) -> None:
        outcome, update, sums = self._attempt("train", round_, rounds)
        self.weights = self.optimizer.step(self.weights, update)
        self.model.load_trainable_state(self.weights)
        self.state.round = round_
        update_norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
        self._record("train", round_, rounds, outcome, sums, update_norm)
        self.run.save(self.state, self.model, self.optimizer.state_dict())

    def _final_evaluation(self, rounds: int) -> None:
        outcome, _, sums = self._attempt("evaluate", rounds, rounds)
        self._record("evaluate", rounds, rounds, outcome, sums, 0.0)

    def _record(
        self,
        task: str,
        round_: int,
        rounds: int,
        outcome: RoundOutcome,
        sums: dict[str, float],
        update_norm: float,
    ) -> None:
        n = len(outcome.survivors)
        pairs = round(sums["eval_pairs"])
        entry: dict[str, Any] = {
            "phase": "reward",
            "task": task,
            "round": round_,
            "evaluated_model_round": round_ - 1 if task == "train" else round_,
            "sampled": len(outcome.sampled),
            "survivors": n,
            "dropped_nodes": sorted({d.node_id for d in outcome.dropouts}),
            "secure_aggregation": self.config.federation.secure_aggregation,
            "dp": self.config.privacy.enabled,
            "fed_eval_pairs": pairs,
            "fed_eval_accuracy": round(sums["eval_correct"]) / pairs if pairs else None,
            "fed_eval_loss": sums["eval_loss_sum"] / pairs if pairs else None,
            "train_loss": sums["train_loss"] / n if task == "train" else None,
            "epsilon_mean": sums["epsilon"] / n,
            "update_norm": update_norm,
            "bytes_down_per_client": max(outcome.bytes_down.values(), default=0),
            "bytes_up_per_client": max(outcome.bytes_up.values(), default=0),
            "adapter_bytes": nbytes(self.spec),
            "full_model_bytes": self.full_model_bytes,
            "seconds": round(outcome.seconds, 3),
        }
        self.state.history.append(entry)
        acc = entry["fed_eval_accuracy"]
        log.info(
            "reward round %d/%d %s: %d/%d clients, held-out accuracy of model %d %s, loss %s, "
            "mean epsilon %.3f%s, %s B down / %s B up per client, %.1f s",
            round_,
            rounds,
            task,
            n,
            len(outcome.sampled),
            entry["evaluated_model_round"],
            f"{acc:.4f}" if acc is not None else "n/a",
            f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "-",
            entry["epsilon_mean"],
            "" if self.config.privacy.enabled else " (DP OFF)",
            entry["bytes_down_per_client"],
            entry["bytes_up_per_client"],
            outcome.seconds,
        )
