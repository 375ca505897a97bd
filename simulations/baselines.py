"""Reference points the federation is judged against, trained on the same data.

* centralized, non-DP: every organization's training comparisons pooled in one
  place, no privacy: the accuracy a federation gives up nothing against;
* centralized, DP: the same pooled data with DP-SGD at the reward phase's epsilon
  and the same number of passes: what DP alone costs, without federation;
* single organization, non-DP: each organization alone on its own data: what a
  partner gets without joining.

All use the clients' own trainer, and the clients' train/held-out split, so the only
differences are data pooling, federation and DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from client.reward_training import DPSettings, OptimizerSettings, train_reward_model
from client.store import Comparison, NewComparison
from common.config import RunConfig
from common.model import (
    EncodedPairs,
    RewardModel,
    build_reward_model,
    encode_pairs,
    load_base,
    score_pairs,
)
from common.privacy import accountant_for, calibrate_noise_multiplier, planned_steps
from simulations.world import World, bayes_accuracy, expected_accuracy


@dataclass(frozen=True)
class TestSet:
    """Test pairs ``(a, b)``, encoded once, with ``P(a preferred)`` for each.

    In the synthetic world the probabilities are the truth (accuracy is then its
    expectation against fresh labels, and the Bayes ceiling is known); for labeled
    comparisons ``a`` is the chosen response and the probability is 1.
    """

    encoded: EncodedPairs
    probabilities: np.ndarray
    labeled: bool

    def accuracy(self, model: RewardModel) -> float:
        return expected_accuracy(self.probabilities, score_pairs(model, self.encoded).numpy())

    @property
    def bayes_ceiling(self) -> float | None:
        return None if self.labeled else bayes_accuracy(self.probabilities)

    def __len__(self) -> int:
        return len(self.probabilities)


def build_test_set(world: World, tokenizer, max_length: int) -> TestSet:  # noqa: ANN001
    """The world's global test pairs and their true preference odds."""
    pairs = world.test_pairs()
    encoded = encode_pairs(
        tokenizer, [p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs], max_length
    )
    probabilities = np.array([world.preference_probability(p) for p in pairs])
    return TestSet(encoded, probabilities, labeled=False)


def labeled_test_set(comparisons: list[NewComparison], tokenizer, max_length: int) -> TestSet:  # noqa: ANN001
    """A test file's comparisons: plain accuracy against its labels."""
    encoded = encode_pairs(
        tokenizer,
        [c.prompt for c in comparisons],
        [c.chosen for c in comparisons],
        [c.rejected for c in comparisons],
        max_length,
    )
    return TestSet(encoded, np.ones(len(comparisons)), labeled=True)


def _model_and_pairs(
    config: RunConfig, comparisons: list[Comparison]
) -> tuple[RewardModel, EncodedPairs]:
    base, tokenizer = load_base(config.model.base, seed=config.seed)
    model = build_reward_model(base, config.model, seed=config.seed)
    pairs = encode_pairs(
        tokenizer,
        [c.prompt for c in comparisons],
        [c.chosen for c in comparisons],
        [c.rejected for c in comparisons],
        config.model.max_length,
    )
    return model, pairs


@dataclass(frozen=True)
class NonDPSchedule:
    """How the non-DP baselines train: the way one trains without DP (Adam, small
    batches, several passes: TRL's RewardTrainer recipe for small models), not with the
    DP phase's few large SGD steps. ``benchmarks/reward_anchor.py`` checks it against
    TRL's RewardTrainer on the same data and base."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 32
    epochs: float = 3.0


NON_DP_SCHEDULE = NonDPSchedule()


def train_non_dp(
    config: RunConfig,
    comparisons: list[Comparison],
    seed: int,
    schedule: NonDPSchedule = NON_DP_SCHEDULE,
) -> RewardModel:
    """A reward model trained without DP on ``comparisons`` (the model settings of
    ``config``, the optimizer and passes of ``schedule``)."""
    model, pairs = _model_and_pairs(config, comparisons)
    steps = max(1, math.ceil(schedule.epochs * len(pairs) / schedule.batch_size))
    train_reward_model(
        model,
        pairs,
        steps=steps,
        batch_size=schedule.batch_size,
        optimizer=OptimizerSettings(schedule.optimizer, schedule.learning_rate),
        dp=None,
        seed=seed,
    )
    return model


def train_dp_central(
    config: RunConfig, comparisons: list[Comparison], seed: int
) -> tuple[RewardModel, float]:
    """A reward model trained centrally with DP-SGD at the reward phase's epsilon, for as
    many passes as the federation makes (rounds x local epochs); returns it and its sigma."""
    model, pairs = _model_and_pairs(config, comparisons)
    sample_rate, per_round = planned_steps(
        len(pairs), config.reward.batch_size, config.reward.local_epochs
    )
    steps = per_round * config.reward.rounds
    privacy = config.privacy
    sigma = calibrate_noise_multiplier(
        [], [(sample_rate, steps)], config.reward_epsilon, privacy.delta, privacy.accountant
    )
    train_reward_model(
        model,
        pairs,
        steps=steps,
        batch_size=config.reward.batch_size,
        optimizer=OptimizerSettings.of(config.reward),
        dp=DPSettings(sigma, privacy.max_grad_norm, privacy.secure_noise),
        accountant=accountant_for([], privacy.accountant),
        seed=seed,
    )
    return model, sigma
