"""The coordinator's loop: reward rounds, then policy rounds, each aggregated,
checked and checkpointed.

Per round: sample clients, send the global tensors with the round instruction,
aggregate the replies (SecAgg+ unless explicitly off), refuse an aggregate that
fails the wire checks, apply the server optimizer, checkpoint, log. After the last
round of a phase one evaluation-only round scores the final model.

Reward rounds send the reward adapter + head and get updates back; the phase's
final evaluation gets the final model's figures on the clients' held-out comparisons.
Policy rounds send the policy adapter + value head, the frozen reward model and the
KL coefficient beta; the aggregated KL of the incoming policy moves beta (the KL
controller), and the KL of the aggregated candidate, measured by the clients in one
more masked exchange (``measure``), decides whether the step is taken, scaled back,
rejected, or taken and shrunk back towards the reference (the trust region). Every figure the
server reads is a sum of the clients' DP-noised statistics (:mod:`common.dp_statistics`).
A restarted server resumes after the last complete checkpoint.
"""

from __future__ import annotations

import copy
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
from common.policy_model import PolicyModel, add_policy, shrink_towards_reference
from common.protocol import RoundInstruction
from common.wire import (
    CANDIDATE_STATS,
    POLICY_STATS,
    REWARD_STATS,
    StatsLayout,
    TensorSpec,
    WireError,
    from_named_arrays,
    nbytes,
    spec_of,
    to_ndarrays,
    unpack_update,
)
from server.checkpoints import RunDirectory, ServerState
from server.kl_controller import AdaptiveKLController, FixedKLController, trust_region
from server.rounds import RoundOutcome, run_plain_round, run_secure_round
from server.server_optimizer import ServerOptimizer
from server.share_graph import ShareGraph

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
        self.policy: PolicyModel = add_policy(
            self.model.lm, self.config.policy_model, seed=self.config.seed + 1
        )
        self.spec: dict[str, list[TensorSpec]] = {
            "reward": spec_of(self.model.trainable_state()),
            "policy": spec_of(self.policy.trainable_state()),
        }
        self.weights: dict[str, dict[str, torch.Tensor]] = {
            "reward": _copy(self.model.trainable_state()),
            "policy": _copy(self.policy.trainable_state()),
        }
        self.optimizers = {
            "reward": ServerOptimizer(self.config.server),
            "policy": ServerOptimizer(self.config.server),
        }
        pc = self.config.policy
        self.kl_controller = (
            AdaptiveKLController(pc.initial_beta, pc.kl_target, pc.kl_horizon)
            if pc.kl_control == "adaptive"
            else FixedKLController(pc.initial_beta)
        )
        self.state = ServerState(seed=self.config.seed)
        self.full_model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        self._last_graph: ShareGraph | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def run_all(self) -> ServerState:
        self._resume_or_start()
        if self.state.finished:
            log.info("run in %s already finished; nothing to do", self.run.path)
            return self.state
        self._wait_for_nodes()
        reward_rounds, policy_rounds = self.config.reward.rounds, self.config.policy.rounds
        if self.state.phase == "reward":
            while self.state.round < reward_rounds:
                self._train_round("reward", self.state.round + 1, reward_rounds)
            if not self.state.reward_evaluated and reward_rounds > 0:
                self._final_evaluation("reward", reward_rounds)
            self.state.reward_evaluated = True
            if policy_rounds > 0:
                self.state.phase, self.state.round = "policy", 0
                self._save()
        if self.state.phase == "policy":
            while self.state.round < policy_rounds:
                self._train_round("policy", self.state.round + 1, policy_rounds)
            self._final_evaluation("policy", policy_rounds)
        self.state.finished = True
        self._save()
        log.info(
            "run finished: %d reward rounds, %d policy rounds; checkpoints in %s",
            reward_rounds,
            policy_rounds,
            self.run.checkpoints,
        )
        return self.state

    def _save(self) -> None:
        self.run.save(
            self.state,
            self.model,
            {phase: o.state_dict() for phase, o in self.optimizers.items()},
            self.policy if self.state.phase == "policy" else None,
        )

    def _resume_or_start(self) -> None:
        self.run.write_run_config(self.config.to_flower())
        latest = self.run.latest()
        if latest is None:
            log.info("starting a new run in %s", self.run.path)
            self.state.run_key = secrets.token_hex(8)
            self.state.kl_controller = self.kl_controller.state_dict()
            self._save()
            return
        checkpoint = self.run.load(latest)
        where = f"checkpoint {latest}"
        self.weights["reward"] = self._checked(checkpoint.reward, "reward", where)
        self.model.load_trainable_state(self.weights["reward"])
        if checkpoint.policy is not None:
            self.weights["policy"] = self._checked(checkpoint.policy, "policy", where)
            self.policy.load_trainable_state(self.weights["policy"])
        for phase, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint.optimizers.get(phase, {}))
        self.state = checkpoint.state
        if self.state.kl_controller:
            self.kl_controller.beta = self.state.kl_controller["beta"]
        # Rounds sent after the checkpoint were numbered too: never reuse their numbers.
        self.state.server_round = max(self.state.server_round, self.run.last_server_round())
        self.run.write_metrics(self.state.history)  # drop lines of rounds after the checkpoint
        log.info(
            "resuming from %s (%s round %d done)", latest.name, self.state.phase, self.state.round
        )

    def _checked(self, tensors: dict[str, torch.Tensor], phase: str, where: str) -> dict:
        arrays = {k: v.numpy() for k, v in tensors.items()}
        return from_named_arrays(arrays, self.spec[phase], where)

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

    def _outgoing(
        self, phase: str, policy: dict[str, torch.Tensor] | None = None
    ) -> list[np.ndarray]:
        """Reward rounds: the reward model. Policy rounds: the policy (the global one, or
        a candidate to measure), then the reward model."""
        arrays = to_ndarrays(self.weights["reward"], self.spec["reward"])
        if phase == "policy":
            policy = self.weights["policy"] if policy is None else policy
            arrays = to_ndarrays(policy, self.spec["policy"]) + arrays
        return arrays

    def _send(
        self, instruction: RoundInstruction, policy: dict[str, torch.Tensor] | None = None
    ) -> RoundOutcome:
        nodes = self._sample(instruction)
        fed = self.config.federation
        arrays = self._outgoing(instruction.phase, policy)
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

    def _layout(self, instruction: RoundInstruction) -> StatsLayout | None:
        """The statistics a reply carries: none from a reward training round, nor from a
        policy training round whose candidate is measured after it."""
        if instruction.phase == "reward":
            return REWARD_STATS if instruction.task == "evaluate" else None
        if instruction.task == "measure":
            return CANDIDATE_STATS
        if instruction.task == "train" and self.config.policy.measures_candidate:
            return None
        return POLICY_STATS

    def _reply_spec(self, instruction: RoundInstruction) -> list[TensorSpec]:
        """The arrays a client's reply holds: the update (training only), then stats."""
        update = self.spec[instruction.phase] if instruction.task == "train" else []
        layout = self._layout(instruction)
        return [*update, *([layout.spec] if layout is not None else [])]

    def _unpack(self, arrays: list[np.ndarray], instruction: RoundInstruction, where: str):
        spec = self.spec[instruction.phase] if instruction.task == "train" else []
        return unpack_update(
            [np.asarray(a, dtype=np.float32) for a in arrays],
            spec,
            self._layout(instruction),
            where,
        )

    def _attempt(
        self,
        phase: str,
        task: str,
        round_: int,
        rounds: int,
        policy: dict[str, torch.Tensor] | None = None,
    ) -> tuple[RoundOutcome, dict, dict[str, float]]:
        """Send one round (retrying a failed one); returns outcome, update, stat sums."""
        for attempt in range(1, MAX_ATTEMPTS_PER_ROUND + 1):
            self.state.server_round += 1
            self.run.reserve_server_round(self.state.server_round)
            instruction = RoundInstruction(
                phase=phase,
                task=task,
                round=round_,
                rounds=rounds,
                attempt=attempt,
                server_round=self.state.server_round,
                run_key=self.state.run_key,
                seed=self.config.seed,
                beta=float(self.kl_controller.beta) if phase == "policy" else 0.0,
            )
            outcome = self._send(instruction, policy)
            for d in outcome.dropouts:
                log.warning(
                    "%s round %d: node %d dropped at %s: %s",
                    phase,
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
                    outcome.mean, instruction, f"aggregate of {phase} round {round_}"
                )
            except (RoundFailed, WireError) as exc:
                log.error("%s round %d attempt %d failed: %s", phase, round_, attempt, exc)
                continue
            n = len(outcome.survivors)
            layout = self._layout(instruction)
            sums = {k: v * n for k, v in layout.decode_sum(stats).items()} if layout else {}
            return outcome, update, sums
        raise RoundFailed(f"{phase} round {round_} failed {MAX_ATTEMPTS_PER_ROUND} times; stopping")

    def _train_round(self, phase: str, round_: int, rounds: int) -> None:
        outcome, update, sums = self._attempt(phase, "train", round_, rounds)
        extra: dict[str, Any] = {"server_round": self.state.server_round}
        optimizer = self.optimizers[phase]
        if phase == "policy":
            update, figures = self._trust_region(round_, rounds, update, sums)
        else:
            figures = self._reward_figures("train", sums)
        if any(u.abs().max() > 0 for u in update.values()):
            self.weights[phase] = optimizer.step(self.weights[phase], update)
        if figures.get("trust_region_shrink", 1.0) < 1.0:
            self.weights[phase] = shrink_towards_reference(
                self.weights[phase], figures["trust_region_shrink"]
            )
        target = self.policy if phase == "policy" else self.model
        target.load_trainable_state(self.weights[phase])
        self.state.round = round_
        update_norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
        self._record(phase, "train", round_, rounds, outcome, update_norm, {**figures, **extra})
        self._save()

    def _trust_region(
        self, round_: int, rounds: int, update: dict[str, torch.Tensor], sums: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Move beta by the global policy's KL; take, scale back or reject the step by
        the KL it would lead to: the aggregated candidate's, measured by the clients
        (``policy.trust-region-kl = "aggregate"``), or the clients' local one. Returns
        the step to take and the round's figures."""
        pc = self.config.policy
        if pc.measures_candidate:
            trial = copy.deepcopy(self.optimizers["policy"])  # its moments must not move yet
            candidate = trial.step(self.weights["policy"], update)
            measured, _, candidate_sums = self._attempt(
                "policy", "measure", round_, rounds, policy=candidate
            )
            figures = self._policy_figures("measure", candidate_sums)
            kl_current, kl_proposed = self.state.policy_kl, figures["kl"]
            figures.update(
                kl=kl_current,
                kl_candidate=kl_proposed,
                measure_server_round=self.state.server_round,
                measure_seconds=round(measured.seconds, 3),
                measure_survivors=len(measured.survivors),
            )
        else:
            figures = self._policy_figures("train", sums)
            kl_current, kl_proposed = figures["kl"], figures["kl_after"]
        decision = trust_region(kl_current, kl_proposed, pc.kl_bound, pc.trust_region)
        if pc.measures_candidate:  # the new global policy's KL, by the rule's own model
            self.state.policy_kl = decision.predicted_kl(kl_current, kl_proposed)
        beta_used = self.kl_controller.beta
        self.kl_controller.update(kl_current, figures["samples"])
        self.state.kl_controller = self.kl_controller.state_dict()
        if decision.scale < 1.0 or decision.shrink < 1.0:
            log.warning("policy round %d: trust region: %s", round_, decision.reason)
        return {name: u * decision.scale for name, u in update.items()}, {
            **figures,
            "beta": beta_used,
            "next_beta": self.kl_controller.beta,
            "trust_region_scale": decision.scale,
            "trust_region_shrink": decision.shrink,
            "trust_region": decision.reason,
        }

    def _final_evaluation(self, phase: str, rounds: int) -> None:
        outcome, _, sums = self._attempt(phase, "evaluate", rounds, rounds)
        extra = {"beta": self.kl_controller.beta} if phase == "policy" else {}
        figures = (self._reward_figures if phase == "reward" else self._policy_figures)(
            "evaluate", sums
        )
        self._record(phase, "evaluate", rounds, rounds, outcome, 0.0, {**figures, **extra})

    def _record(
        self,
        phase: str,
        task: str,
        round_: int,
        rounds: int,
        outcome: RoundOutcome,
        update_norm: float,
        figures: dict[str, Any],
    ) -> None:
        n = len(outcome.survivors)
        entry: dict[str, Any] = {
            "phase": phase,
            "task": task,
            "round": round_,
            "server_round": self.state.server_round,
            "evaluated_model_round": round_ - 1 if task == "train" else round_,
            "sampled": len(outcome.sampled),
            "survivors": n,
            "dropped_nodes": sorted({d.node_id for d in outcome.dropouts}),
            "secure_aggregation": self.config.federation.secure_aggregation,
            "dp": self.config.privacy.enabled,
            "update_norm": update_norm,
            "bytes_down_per_client": max(outcome.bytes_down.values(), default=0),
            "bytes_up_per_client": max(outcome.bytes_up.values(), default=0),
            "adapter_bytes": nbytes(self.spec[phase]),
            "full_model_bytes": self.full_model_bytes,
            "seconds": round(outcome.seconds, 3),
            "timeline": [stage.to_json() for stage in outcome.stages],
            "server_seconds": round(outcome.seconds - sum(s.seconds for s in outcome.stages), 3),
            "secagg": outcome.share_graph.to_json() if outcome.share_graph else None,
            **figures,
        }
        self.state.history.append(entry)
        if outcome.share_graph is not None and outcome.share_graph != self._last_graph:
            log.info("%s round %d: %s", phase, round_, outcome.share_graph.describe())
            self._last_graph = outcome.share_graph
        dp = "" if self.config.privacy.enabled else " (DP OFF)"
        traffic = (
            f"{entry['bytes_down_per_client']} B down / {entry['bytes_up_per_client']} B up "
            f"per client, {outcome.seconds:.1f} s"
        )
        if phase == "reward":
            acc, loss = entry["fed_eval_accuracy"], entry["fed_eval_loss"]
            figures = (
                f"held-out accuracy {acc:.4f}, loss {loss:.4f} (noised)"
                if acc is not None
                else "update only"
            )
        else:
            figures = (
                f"score {entry['score']:.3f}, KL {entry['kl']:.3f}"
                + (f" -> {entry['kl_after']:.3f} local" if "kl_after" in entry else "")
                + (f", candidate {entry['kl_candidate']:.3f}" if "kl_candidate" in entry else "")
                + f", beta {entry['beta']:.4f}"
                + (f", step x{entry['trust_region_scale']:.3f}" if task == "train" else "")
            )
        log.info(
            "%s round %d/%d %s: %d/%d clients, %s%s, %s",
            phase,
            round_,
            rounds,
            task,
            n,
            len(outcome.sampled),
            figures,
            dp,
            traffic,
        )

    @staticmethod
    def _reward_figures(task: str, sums: dict[str, float]) -> dict[str, Any]:
        """The final evaluation's figures, from the noised sums (None in training rounds)."""
        if task != "evaluate":
            return {"fed_eval_pairs": None, "fed_eval_accuracy": None, "fed_eval_loss": None}
        pairs = max(sums["eval_pairs"], 1.0)
        return {
            "fed_eval_pairs": round(sums["eval_pairs"]),
            "fed_eval_accuracy": min(1.0, max(0.0, sums["eval_correct"] / pairs)),
            "fed_eval_loss": max(0.0, sums["eval_loss_sum"] / pairs),
        }

    def _policy_figures(self, task: str, sums: dict[str, float]) -> dict[str, Any]:
        """Means over the measured prompts of all clients, from the noised sums. The KL
        controller counts the round's trained samples: the prompts measured, scaled to
        the training batch (``batch-size / measure-prompts``), times the iterations (and
        PPO's samples per prompt)."""
        pc = self.config.policy
        measured = max(sums["measured"], 1.0)
        figures = {
            "measured": round(sums["measured"]),
            "score": sums["score_sum"] / measured,
            "kl": max(0.0, sums["kl_sum"] / measured),
        }
        if task == "evaluate":
            figures["ended"] = min(1.0, max(0.0, sums["ended"] / measured))
            return figures
        per_prompt = pc.samples_per_prompt if pc.objective == "ppo" else 1
        trained = max(0.0, sums["measured"]) * pc.batch_size / pc.measure_prompts
        figures["samples"] = round(trained * pc.iterations * per_prompt)
        if task == "train":
            figures["ended"] = min(1.0, max(0.0, sums["ended"] / measured))
            figures["kl_after"] = max(0.0, sums["kl_after_sum"] / measured)
        return figures


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
