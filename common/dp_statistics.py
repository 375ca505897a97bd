"""DP statistics: the figures a client reports beside its update, noised before it sends.

A statistic is a sum over privacy units of a per-unit contribution, each clipped to its
field's unit bound (:class:`common.wire.StatsLayout`). Adding or removing one unit then
moves the vector of statistics, each divided by its bound, by at most sqrt(fields) in
L2, so Gaussian noise of std ``sigma * sqrt(fields) * bound`` on each field makes the
release the Gaussian mechanism with noise multiplier ``sigma`` on the units it read.
When those are a Poisson sample at rate q, the release is one step of the subsampled
Gaussian mechanism: the ledger charges it as ``DPEvent(sigma, q, 1)``, composed with
DP-SGD's steps like any other.

One noise multiplier serves every release of a run: the smallest with which all the
releases the run plans, alone, spend ``privacy.statistics-share`` of the budget.
Training is then calibrated to what is left (the releases still to come are counted
in full before its noise is chosen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch

from common.config import RunConfig
from common.dp_randomness import DPRandomness
from common.privacy import DPEvent, calibrate_noise_multiplier
from common.protocol import RoundInstruction
from common.wire import MAX_COUNT, StatsLayout

STATISTICS = "statistics"
"""The ledger's name for these releases (DP-SGD runs are ``training``)."""


def measurement_rate(config: RunConfig, prompts: int) -> float:
    """Poisson rate of the prompts a policy round measures: ``policy.measure-prompts``
    expected."""
    return min(1.0, config.policy.measure_prompts / prompts) if prompts > 0 else 1.0


def planned_releases(config: RunConfig, prompts: int) -> list[tuple[float, int]]:
    """(sample rate, releases) of every statistics release the run plans.

    The reward phase releases once, its final evaluation on the held-out comparisons
    (all of them: rate 1); its training rounds send no statistics. The policy phase
    releases once per round and in its final evaluation, on Poisson samples of prompts:
    the candidate's measurement with ``policy.trust-region-kl = "aggregate"`` (the
    training exchange then sends the update only), else the training exchange's own.
    """
    plan = []
    if config.reward.rounds > 0:
        plan.append((1.0, 1))
    if config.policy.rounds > 0:
        plan.append((measurement_rate(config, prompts), config.policy.rounds + 1))
    return plan


def releases_left(instruction: RoundInstruction) -> int:
    """Releases of the instruction's phase from this round on, this one included."""
    if instruction.phase == "reward" or instruction.task == "evaluate":
        return 1
    return instruction.rounds - instruction.round + 2  # these rounds + the final evaluation


@lru_cache(maxsize=64)
def _calibrated(plan: tuple[tuple[float, int], ...], budget: float, delta: float, kind: str):
    return calibrate_noise_multiplier([], list(plan), budget, delta, kind)


def statistics_noise_multiplier(config: RunConfig, prompts: int) -> float:
    """The noise multiplier of every statistics release of the run."""
    plan = tuple(planned_releases(config, prompts))
    budget = config.privacy.statistics_share * config.privacy.epsilon
    return _calibrated(plan, budget, config.privacy.delta, config.privacy.accountant)


def statistics_event(config: RunConfig, instruction: RoundInstruction, prompts: int) -> DPEvent:
    """This round's release, as the ledger charges it."""
    rate = 1.0 if instruction.phase == "reward" else measurement_rate(config, prompts)
    return DPEvent(statistics_noise_multiplier(config, prompts), rate, 1)


def future_statistics(
    config: RunConfig, instruction: RoundInstruction, prompts: int
) -> list[DPEvent]:
    """The phase's releases from this round on: training plans its noise around them."""
    event = statistics_event(config, instruction, prompts)
    return [DPEvent(event.noise_multiplier, event.sample_rate, releases_left(instruction))]


def clipped_sums(rows: np.ndarray, layout: StatsLayout) -> dict[str, float]:
    """Sum of per-unit contributions (one row per unit, one column per field), each
    clipped to its field's unit bound: the sums whose sensitivity the noise is for."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(layout.fields))[: int(MAX_COUNT)]
    bounds = layout.unit_bounds
    sums = np.clip(rows, -bounds, bounds).sum(axis=0)
    return dict(zip(layout.names, sums.tolist(), strict=True))


def noised(
    sums: Mapping[str, float],
    layout: StatsLayout,
    noise_multiplier: float,
    randomness: DPRandomness,
) -> dict[str, float]:
    """``sums`` (from :func:`clipped_sums`) with the Gaussian mechanism's noise, then
    clamped to what the wire carries (post-processing, which costs no privacy)."""
    bounds = layout.unit_bounds
    std = noise_multiplier * math.sqrt(len(bounds))
    noise = randomness.gaussian(1.0, torch.zeros(len(bounds), dtype=torch.float64)).numpy()
    values = np.array([sums[name] for name in layout.names]) + std * bounds * noise
    values = np.clip(values, -MAX_COUNT * bounds, MAX_COUNT * bounds)
    return dict(zip(layout.names, values.tolist(), strict=True))


def noise_std(layout: StatsLayout, noise_multiplier: float) -> dict[str, float]:
    """Per field, the std of the noise one client's release carries."""
    scale = noise_multiplier * math.sqrt(len(layout.fields))
    return {name: scale * bound for name, bound in layout.fields}
