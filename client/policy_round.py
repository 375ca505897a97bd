"""One client's part in a policy round: budget, train the policy with DP, measure, report.

A training round gets the global policy adapter + value head, the frozen global reward
model and the KL coefficient beta. The client (1) plans the noise that keeps its whole
run within its epsilon budget, or declines, (2) charges the round's mechanisms to its
ledger *before* they run, (3) trains the configured objective
(:mod:`client.policy_objectives`: PPO iterations on Poisson samples of its prompts, or
DPO steps on its comparisons) and (4) returns the update (new - global), to be masked
by SecAgg+. A ``measure`` round (the aggregated candidate, for the server's trust
region) or ``evaluate`` round (the phase's final policy) measures the policy it was
sent on a Poisson sample of prompts and returns the noised sums
(:mod:`common.dp_statistics`). With ``policy.trust-region-kl = "local"`` a training
round also measures the incoming and the updated policy on one sample and sends those
sums beside its update. Training diagnostics (losses, entropy, clip fraction) stay in
the client's log: they could not be made DP cheaply, so they are not sent.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
import torch

from client.policy_objectives import TrainingContext, poisson_sample, policy_objective
from client.ppo_training import Rollouts, SamplingSettings, generate_rollouts
from client.privacy_charges import Mechanism, begin_charges, release_statistics
from client.reward_round import cached_reward_model, last_training_noise, round_seed
from client.reward_training import DPSettings, OptimizerSettings
from client.round_timeline import timed
from client.store import PreferenceStore
from common.config import ModelConfig, PolicyConfig, RunConfig
from common.dp_randomness import dp_randomness
from common.dp_statistics import (
    STATISTICS,
    future_statistics,
    measurement_rate,
    statistics_event,
)
from common.model import RewardModel, score_responses, train_only
from common.policy_model import POLICY_ADAPTER, PolicyModel, add_policy
from common.ppo import kl_per_token
from common.privacy import BudgetExceeded, DPEvent, calibrate_noise_multiplier, epsilon
from common.protocol import RoundInstruction
from common.wire import (
    CANDIDATE_STATS,
    POLICY_STATS,
    TensorSpec,
    from_ndarrays,
    pack_update,
    spec_of,
)

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cached_policy_model(model_config: ModelConfig, policy_config: ModelConfig):  # noqa: ANN201
    """The process's reward model with a policy adapter + value head added to its base."""
    reward, tokenizer = cached_reward_model(model_config)
    policy = add_policy(reward.lm, policy_config)
    train_only(policy, POLICY_ADAPTER, ("value_head.",))
    return reward, policy, tokenizer


def round_specs(
    reward: RewardModel, policy: PolicyModel
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(policy spec, reward spec): a policy round carries both, policy first."""
    return spec_of(policy.trainable_state()), spec_of(reward.trainable_state())


def per_sample_kl(rollouts: Rollouts, estimator: str) -> torch.Tensor:
    """Each response's KL to the reference, summed over its tokens."""
    kl = kl_per_token(rollouts.logp_old, rollouts.logp_ref, estimator) * rollouts.response_mask
    return kl.sum(dim=1)


def measurement_rows(before: Rollouts, after: Rollouts | None, estimator: str) -> np.ndarray:
    """One row per measured prompt, in :data:`POLICY_STATS` order: (1, the incoming
    policy's score, its KL, the updated policy's KL on the same prompt, whether the
    incoming policy's response ended)."""
    kl_before = per_sample_kl(before, estimator)
    kl_after = per_sample_kl(after, estimator) if after is not None else torch.zeros_like(kl_before)
    if after is not None and after.prompts != before.prompts:
        raise AssertionError("the two measurements must be on the same prompts")
    columns = [torch.ones_like(kl_before), before.scores, kl_before, kl_after, before.ended]
    return torch.stack([c.double().cpu() for c in columns], dim=1).numpy()


NO_ROWS = np.zeros((0, len(POLICY_STATS.fields)))
"""No prompt was measured (a Poisson sample may be empty)."""
CANDIDATE_COLUMNS = [POLICY_STATS.names.index(name) for name in CANDIDATE_STATS.names]
"""The columns of :func:`measurement_rows` a ``measure`` round sends."""


def _pop(charges: list[int]) -> int | None:
    """The next charge begun for this round, in the order its mechanisms run."""
    return charges.pop(0) if charges else None


def policy_round(
    config: RunConfig,
    store: PreferenceStore,
    instruction: RoundInstruction,
    global_arrays: list[np.ndarray],
    run_id: str,
    where: str,
) -> list[np.ndarray]:
    """Run the client's part of a policy round; returns the arrays to be masked."""
    pc = config.policy
    with timed("load"):
        reward, policy, tokenizer = cached_policy_model(config.model, config.policy_model)
    policy_spec, reward_spec = round_specs(reward, policy)
    incoming = from_ndarrays(global_arrays, [*policy_spec, *reward_spec], where)
    global_policy = {s.name: incoming[s.name] for s in policy_spec}
    policy.load_trainable_state(global_policy)
    reward.load_trainable_state({s.name: incoming[s.name] for s in reward_spec})

    prompts = store.prompts()
    if not prompts:
        raise ValueError(f"{where}: the store {store.path} holds no prompts")
    sampling = SamplingSettings.of(pc)
    seed = round_seed(instruction, store)
    secure = config.privacy.secure_noise
    # The measured prompts and the statistics' noise: one stream of their own.
    statistics_randomness = dp_randomness(
        secure, torch.device("cpu"), round_seed(instruction, store, STATISTICS)
    )
    measured = poisson_sample(
        prompts, measurement_rate(config, len(prompts)), statistics_randomness
    )

    def score_fn(prompt_texts, responses):  # noqa: ANN001, ANN202
        return score_responses(reward, tokenizer, prompt_texts, responses, config.model.max_length)

    def measure(generation_seed: int) -> Rollouts | None:
        if not measured:
            return None
        with timed("measure"):
            return generate_rollouts(
                policy, tokenizer, measured, score_fn, sampling, generation_seed
            )

    spent = store.privacy_events()
    # With the trust region on the aggregate, the candidate's measurement is the round's
    # release and the training exchange sends the update only.
    releases = instruction.task != "train" or not pc.measures_candidate
    mechanisms: list[Mechanism] = []
    stats_event = None
    if config.privacy.enabled and releases:
        stats_event = statistics_event(config, instruction, len(prompts))
        mechanisms.append(Mechanism(stats_event, STATISTICS, "prompt"))

    if instruction.task in ("measure", "evaluate"):  # the incoming policy: a candidate or final
        charges = (
            begin_charges(store, run_id, instruction, config, mechanisms)[0] if mechanisms else []
        )
        before = measure(round_seed(instruction, store, "measure before"))
        rows = measurement_rows(before, None, pc.kl_estimator) if before else NO_ROWS
        layout = POLICY_STATS
        if instruction.task == "measure":
            rows, layout = rows[:, CANDIDATE_COLUMNS], CANDIDATE_STATS
        stats = release_statistics(
            store, rows, layout, stats_event, statistics_randomness, _pop(charges)
        )
        return pack_update({}, [], stats, config.federation.secagg_clipping_range)

    objective = policy_objective(config, store, prompts, where)
    rate = min(1.0, pc.batch_size / objective.units)

    dp = None
    if config.privacy.enabled:
        with timed("plan noise"):
            coming = future_statistics(config, instruction, len(prompts))
            dp, event = _plan_noise(
                config, [*spent, *coming], rate, objective.steps_per_unit, store, instruction
            )
        mechanisms.insert(0, Mechanism(event, "training", objective.unit))
    charges, epsilon_after = (
        begin_charges(store, run_id, instruction, config, mechanisms)
        if mechanisms
        else ([], epsilon(spent, config.privacy.delta, config.privacy.accountant))
    )
    before = measure(round_seed(instruction, store, "measure before")) if releases else None

    train_only(policy, POLICY_ADAPTER, objective.trained_heads, pc.freeze_lora_a)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = OptimizerSettings.of(pc).build(params)
    loss_text = objective.train(
        TrainingContext(policy, tokenizer, score_fn, optimizer, dp, instruction.beta, seed)
    )
    if dp is not None:
        store.commit_charge(_pop(charges), pc.iterations)
    after = measure(round_seed(instruction, store, "measure after")) if releases else None
    rows = measurement_rows(before, after, pc.kl_estimator) if before else NO_ROWS
    figures = ""
    if len(rows):  # the exact local figures, for this client's log only
        score, kl, kl_after = rows[:, 1].mean(), rows[:, 2].mean(), rows[:, 3].mean()
        figures = f"score {score:.3f}, KL {kl:.3f} -> {kl_after:.3f}, "
    log.info(
        "%s: policy round %d (%s, beta %.4f): %s%s, epsilon %.3f%s",
        where, instruction.round, pc.method, instruction.beta, figures, loss_text,
        epsilon_after, "" if dp else " (DP OFF)",
    )  # fmt: skip
    new_state = policy.trainable_state()
    update = {name: new_state[name].detach().cpu() - global_policy[name] for name in global_policy}
    stats = (
        release_statistics(
            store, rows, POLICY_STATS, stats_event, statistics_randomness, _pop(charges)
        )
        if releases
        else None
    )
    return pack_update(update, policy_spec, stats, config.federation.secagg_clipping_range)


def _plan_noise(
    config: RunConfig,
    spent: list[DPEvent],
    rate: float,
    repeats: int,
    store: PreferenceStore,
    instruction: RoundInstruction,
) -> tuple[DPSettings, DPEvent]:
    """Noise for this round, calibrated so that it and the policy rounds still planned
    fit the whole budget after everything already spent (the reward phase included).

    Each iteration is one Poisson sample of units, each entering ``repeats`` noisy
    steps (PPO's epochs, :func:`client.ppo_training.dp_event_per_iteration`).
    """
    pc: PolicyConfig = config.policy
    previous = last_training_noise(store, "policy")
    remaining = instruction.rounds - instruction.round + 1
    try:
        per_unit = calibrate_noise_multiplier(
            spent,
            [(rate, pc.iterations)] * remaining,
            config.privacy.epsilon,
            config.privacy.delta,
            config.privacy.accountant,
            previous=previous,
        )
    except BudgetExceeded as exc:
        raise BudgetExceeded(f"declining policy round {instruction.round}: {exc}") from None
    dp = DPSettings(per_unit * math.sqrt(repeats), pc.max_grad_norm, config.privacy.secure_noise)
    # Per PPO iteration dp_event_per_iteration(dp, rate, ppo_epochs) has noise per_unit.
    return dp, DPEvent(per_unit, rate, pc.iterations)
