"""The policy phase's objectives, one object each behind one small interface.

A policy round does the same around every objective (plan the noise, charge it,
measure before and after, send the update); what differs is what one privacy unit
is, how many noisy steps each sampled unit enters, which heads train, and the local
training itself. :func:`policy_objective` picks the configured one.

- :class:`PPOObjective`: rollouts on the client's prompt pool scored by the
  federation's reward model, then clipped PPO updates, with GAE on a value head or
  critic-free group baselines (RLOO, GRPO). The unit is a prompt with all its
  sampled responses.
- :class:`DPOObjective`: DPO on the client's training comparisons (no reward model,
  no rollouts). The unit is a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from client.dpo_training import encode_dpo_batch, train_dpo
from client.ppo_training import (
    PPOSettings,
    SamplingSettings,
    ScoreFn,
    generate_rollouts,
    ppo_update,
    repeat_prompts,
)
from client.reward_training import DPSettings
from client.round_timeline import timed
from client.store import PreferenceStore
from common.config import RunConfig
from common.dp_randomness import DPRandomness, dp_randomness
from common.policy_model import PolicyModel


@dataclass(frozen=True)
class TrainingContext:
    """What an objective's local training needs from the round."""

    policy: PolicyModel
    tokenizer: object
    score_fn: ScoreFn
    optimizer: torch.optim.Optimizer
    dp: DPSettings | None
    beta: float
    seed: int


class PolicyObjective(Protocol):
    name: str
    unit: str
    """The privacy unit the ledger records (``prompt`` or ``comparison``)."""

    @property
    def units(self) -> int:
        """How many units this client holds (the sampling rate's denominator)."""

    @property
    def steps_per_unit(self) -> int:
        """Noisy steps a sampled unit enters per iteration (they compose into one
        Gaussian mechanism with noise ``sigma / sqrt(steps_per_unit)``)."""

    @property
    def trained_heads(self) -> tuple[str, ...]:
        """Trainable module prefixes beside the policy adapter."""

    def train(self, context: TrainingContext) -> str:
        """Train the policy in place for one round; returns a line for the log."""


def poisson_sample(items: list[str], rate: float, randomness: DPRandomness) -> list[str]:
    keep = randomness.poisson_mask(len(items), rate)
    return [item for item, k in zip(items, keep.tolist(), strict=True) if k]


class PPOObjective:
    """KL-regularized PPO on the client's prompt pool (see :mod:`client.ppo_training`)."""

    name = "ppo"
    unit = "prompt"

    def __init__(self, config: RunConfig, prompts: list[str]) -> None:
        self.config = config.policy
        self.prompts = prompts
        self.settings = PPOSettings.of(config.policy)
        self.sampling = SamplingSettings.of(config.policy)

    @property
    def units(self) -> int:
        return len(self.prompts)

    @property
    def steps_per_unit(self) -> int:
        return self.config.ppo_epochs

    @property
    def trained_heads(self) -> tuple[str, ...]:
        return () if self.settings.critic_free else ("value_head.",)

    def train(self, context: TrainingContext) -> str:
        pc, c = self.config, context
        rate = min(1.0, pc.batch_size / self.units)
        prompt_sampling = dp_randomness(c.dp.secure, torch.device("cpu"), c.seed) if c.dp else None
        generator = torch.Generator().manual_seed(c.seed)

        def sample() -> list[str]:
            if prompt_sampling is not None:
                return poisson_sample(self.prompts, rate, prompt_sampling)
            pick = torch.randperm(self.units, generator=generator)[: pc.batch_size]
            return [self.prompts[i] for i in pick.tolist()]

        stats = []
        for iteration in range(pc.iterations):
            with timed("generate"):
                batch = repeat_prompts(sample(), self.settings.samples_per_prompt)
                rollouts = generate_rollouts(
                    c.policy, c.tokenizer, batch, c.score_fn, self.sampling, c.seed + 1 + iteration
                )
            with timed("train"):
                stats.append(
                    ppo_update(
                        c.policy,
                        rollouts,
                        c.beta,
                        self.settings,
                        c.optimizer,
                        dp=c.dp,
                        expected_batch_size=pc.batch_size,
                        seed=c.seed + 101 + iteration,
                    )  # fmt: skip
                )
        return (
            f"{pc.advantage} advantages, policy loss {np.mean([s.policy_loss for s in stats]):.4f}, "
            f"entropy {np.mean([s.entropy for s in stats]):.3f}, "
            f"clip fraction {np.mean([s.clip_fraction for s in stats]):.3f}"
        )


class DPOObjective:
    """DPO on the client's training comparisons (see :mod:`client.dpo_training`)."""

    name = "dpo"
    unit = "comparison"
    steps_per_unit = 1
    trained_heads: tuple[str, ...] = ()
    """DPO does not use the value head: Opacus would wait for its per-sample gradients."""

    def __init__(self, config: RunConfig, store: PreferenceStore, where: str) -> None:
        self.config = config
        self.comparisons = store.comparisons("train", config.reward.heldout_fraction)
        if not self.comparisons:
            raise ValueError(f"{where}: the store {store.path} holds no training comparisons")

    @property
    def units(self) -> int:
        return len(self.comparisons)

    def train(self, context: TrainingContext) -> str:
        c, pc = context, self.config.policy
        batch = encode_dpo_batch(
            c.tokenizer,
            [x.prompt for x in self.comparisons],
            [x.chosen for x in self.comparisons],
            [x.rejected for x in self.comparisons],
            self.config.model.max_length,
        )
        with timed("train"):
            result = train_dpo(
                c.policy, batch, steps=pc.iterations, batch_size=pc.batch_size,
                beta=c.beta, optimizer=c.optimizer, dp=c.dp, seed=c.seed + 101,
            )  # fmt: skip
        return f"DPO loss {result.mean_loss:.4f}"


def policy_objective(
    config: RunConfig, store: PreferenceStore, prompts: list[str], where: str
) -> PolicyObjective:
    """The configured objective over this client's data."""
    if config.policy.objective == "ppo":
        return PPOObjective(config, prompts)
    return DPOObjective(config, store, where)
