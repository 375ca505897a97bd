"""Reference points the federation is judged against, trained on the same data.

* centralized, non-DP: every organization's training comparisons pooled in one
  place, no privacy: the accuracy a federation gives up nothing against;
* single organization, non-DP: each organization alone on its own data: what a
  partner gets without joining.

Both use the clients' own trainer with DP off, and the clients' train/held-out
split, so the only differences are data pooling, federation and DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from client.reward_training import OptimizerSettings, train_reward_model
from client.store import Comparison
from common.config import RunConfig
from common.model import (
    EncodedPairs,
    RewardModel,
    build_reward_model,
    encode_pairs,
    load_base,
    score_pairs,
)
from simulations.world import Pair, World, expected_accuracy


@dataclass(frozen=True)
class TestSet:
    """The world's global test pairs, encoded once, with their true preference odds."""

    pairs: list[Pair]
    encoded: EncodedPairs
    probabilities: np.ndarray

    def accuracy(self, model: RewardModel) -> float:
        return expected_accuracy(self.probabilities, score_pairs(model, self.encoded).numpy())


def build_test_set(world: World, tokenizer, max_length: int) -> TestSet:
    pairs = world.test_pairs()
    encoded = encode_pairs(
        tokenizer, [p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs], max_length
    )
    return TestSet(pairs, encoded, np.array([world.preference_probability(p) for p in pairs]))


def train_non_dp(
    config: RunConfig, comparisons: list[Comparison], epochs: float, seed: int
) -> RewardModel:
    """A reward model trained without DP on ``comparisons`` for ``epochs`` passes."""
    base, tokenizer = load_base(config.model.base, seed=config.seed)
    model = build_reward_model(base, config.model, seed=config.seed)
    pairs = encode_pairs(
        tokenizer,
        [c.prompt for c in comparisons],
        [c.chosen for c in comparisons],
        [c.rejected for c in comparisons],
        config.model.max_length,
    )
    steps = max(1, math.ceil(epochs * len(pairs) / config.reward.batch_size))
    train_reward_model(
        model,
        pairs,
        steps=steps,
        batch_size=config.reward.batch_size,
        optimizer=OptimizerSettings.of(config.reward),
        dp=None,
        seed=seed,
    )
    return model
