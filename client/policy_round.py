"""One client's part in a policy round: measure, budget, train the policy with DP, report.

Given the global policy adapter + value head, the frozen global reward model and
the KL coefficient beta, the client (1) plans the noise that keeps its whole run
within its epsilon budget, or declines, (2) records the charge in its ledger
*before* training, (3) runs ``policy.iterations`` PPO iterations on Poisson samples
of its prompts (or DPO steps on its comparisons), (4) measures the updated policy's
KL to the reference on fresh samples, and (5) returns the update (new - global) with
the whitelisted statistics, both to be masked by SecAgg+.

The statistics (reward score, KL before and after, entropy, ...) are computed on
local prompts and are not DP-noised; SecAgg+ hides each client's values, the server
reads only their mean over the round's survivors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from client.dpo_training import encode_dpo_batch, train_dpo
from client.ppo_training import (
    PPOSettings,
    Rollouts,
    SamplingSettings,
    generate_rollouts,
    ppo_update,
)
from client.reward_round import begin_round_charge, cached_reward_model, round_seed
from client.reward_training import DPSettings, OptimizerSettings
from client.round_timeline import timed
from client.store import PreferenceStore
from common.config import ModelConfig, PolicyConfig, RunConfig
from common.dp_randomness import DPRandomness, dp_randomness
from common.model import RewardModel, score_responses, train_only
from common.policy_model import POLICY_ADAPTER, PolicyModel, add_policy
from common.ppo import kl_per_token
from common.privacy import (
    BudgetExceeded,
    DPEvent,
    calibrate_noise_multiplier,
    check_budget,
    epsilon,
)
from common.protocol import RoundInstruction
from common.wire import MAX_COUNT, POLICY_STATS, TensorSpec, from_ndarrays, pack_update, spec_of

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


@dataclass(frozen=True)
class Measurement:
    score: float
    """Mean reward-model score of the samples."""
    kl: float
    """Mean over samples of the summed per-token KL to the reference."""
    ended: float
    """Share of samples that ended with EOS within max-new-tokens."""


def measure(rollouts: Rollouts, estimator: str) -> Measurement:
    """Score, KL and EOS share of a batch of samples. The KL is capped where its
    masked statistic saturates: past it the trust region only needs to know "too far"."""
    if len(rollouts) == 0:
        return Measurement(0.0, 0.0, 0.0)
    kl = kl_per_token(rollouts.logp_old, rollouts.logp_ref, estimator) * rollouts.response_mask
    score_cap = dict(POLICY_STATS.fields)["score"]
    return Measurement(
        float(rollouts.scores.mean().clamp(-score_cap, score_cap)),
        min(float(kl.sum(dim=1).mean()), dict(POLICY_STATS.fields)["kl"]),
        float(rollouts.ended.float().mean()),
    )


def poisson_sample(items: list[str], rate: float, randomness: DPRandomness) -> list[str]:
    keep = randomness.poisson_mask(len(items), rate)
    return [item for item, k in zip(items, keep.tolist(), strict=True) if k]


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
    generator = torch.Generator().manual_seed(seed)

    def score_fn(prompt_texts, responses):  # noqa: ANN001, ANN202
        return score_responses(reward, tokenizer, prompt_texts, responses, config.model.max_length)

    def sample_measurement(offset: int) -> Measurement:
        # A fixed-size sample of local prompts, for statistics only (not trained on).
        pick = torch.randperm(len(prompts), generator=generator)[: pc.batch_size].tolist()
        with timed("measure"):
            rollouts = generate_rollouts(
                policy, tokenizer, [prompts[i] for i in pick], score_fn, sampling, seed + offset
            )
            return measure(rollouts, pc.kl_estimator)

    spent = store.privacy_events()
    stats = dict.fromkeys(POLICY_STATS.names, 0.0)
    stats["epsilon"] = epsilon(spent, config.privacy.delta, config.privacy.accountant)
    if instruction.task == "evaluate":
        before = sample_measurement(0)
        stats.update(score=before.score, kl=before.kl, kl_after=before.kl, ended=before.ended)
        return pack_update(
            {}, [], POLICY_STATS.encode(stats), config.federation.secagg_clipping_range
        )

    if pc.objective == "ppo":
        units = len(prompts)
    else:
        comparisons = store.comparisons("train", config.reward.heldout_fraction)
        if not comparisons:
            raise ValueError(f"{where}: the store {store.path} holds no training comparisons")
        units = len(comparisons)
    rate = min(1.0, pc.batch_size / units)

    dp, charge = None, None
    if config.privacy.enabled:
        with timed("plan noise"):
            dp, event = _plan_noise(config, spent, rate, store, instruction)
        stats["epsilon"] = check_budget(
            spent, event, config.privacy.epsilon, config.privacy.delta, config.privacy.accountant
        )
        charge = begin_round_charge(store, run_id, instruction, event, config)

    # DPO does not use the value head: Opacus would wait for its per-sample gradients.
    train_only(policy, POLICY_ADAPTER, ("value_head.",) if pc.objective == "ppo" else ())
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = OptimizerSettings.of(pc).build(params)
    if pc.objective == "ppo":
        settings = PPOSettings.of(pc)
        first = None
        ppo_stats = []
        prompt_sampling = dp_randomness(dp.secure, torch.device("cpu"), seed) if dp else None
        for iteration in range(pc.iterations):
            if prompt_sampling is not None:
                batch = poisson_sample(prompts, rate, prompt_sampling)
            else:
                pick = torch.randperm(len(prompts), generator=generator)[: pc.batch_size]
                batch = [prompts[i] for i in pick.tolist()]
            with timed("generate"):
                rollouts = generate_rollouts(
                    policy, tokenizer, batch, score_fn, sampling, seed + 1 + iteration
                )
            if first is None and len(rollouts):
                first = measure(rollouts, pc.kl_estimator)
            with timed("train"):
                ppo_stats.append(
                    ppo_update(
                        policy,
                        rollouts,
                        instruction.beta,
                        settings,
                        optimizer,
                        dp=dp,
                        expected_batch_size=pc.batch_size,
                        seed=seed + 101 + iteration,
                    )  # fmt: skip
                )
        before = first or sample_measurement(1000)
        stats.update(
            samples=float(min(MAX_COUNT, sum(s.rollouts for s in ppo_stats))),
            entropy=float(np.mean([s.entropy for s in ppo_stats])),
            policy_loss=float(np.mean([s.policy_loss for s in ppo_stats])),
            value_loss=float(np.mean([s.value_loss for s in ppo_stats])),
            clip_fraction=float(np.mean([s.clip_fraction for s in ppo_stats])),
            approx_kl=float(np.mean([s.approx_kl for s in ppo_stats])),
        )
        loss_text = f"policy loss {stats['policy_loss']:.4f}"
    else:
        before = sample_measurement(1000)
        batch = encode_dpo_batch(
            tokenizer,
            [c.prompt for c in comparisons],
            [c.chosen for c in comparisons],
            [c.rejected for c in comparisons],
            config.model.max_length,
        )
        with timed("train"):
            dpo = train_dpo(
                policy, batch, steps=pc.iterations, batch_size=pc.batch_size,
                beta=instruction.beta, optimizer=optimizer, dp=dp, seed=seed + 101,
            )  # fmt: skip
        stats.update(policy_loss=dpo.mean_loss, samples=float(min(MAX_COUNT, dpo.comparisons)))
        loss_text = f"DPO loss {dpo.mean_loss:.4f}"
    if charge is not None:
        store.commit_charge(charge, pc.iterations)
    after = sample_measurement(2000)
    stats.update(
        score=before.score,
        kl=before.kl,
        kl_after=after.kl,
        ended=before.ended,
        iterations=float(pc.iterations),
    )
    log.info(
        "%s: policy round %d (%s, beta %.4f): score %.3f, KL %.3f -> %.3f, %s, epsilon %.3f%s",
        where, instruction.round, pc.objective, instruction.beta, before.score, before.kl,
        after.kl, loss_text, stats["epsilon"], "" if dp else " (DP OFF)",
    )  # fmt: skip
    new_state = policy.trainable_state()
    update = {name: new_state[name].detach().cpu() - global_policy[name] for name in global_policy}
    return pack_update(
        update, policy_spec, POLICY_STATS.encode(stats), config.federation.secagg_clipping_range
    )


def _plan_noise(
    config: RunConfig,
    spent: list[DPEvent],
    rate: float,
    store: PreferenceStore,
    instruction: RoundInstruction,
) -> tuple[DPSettings, DPEvent]:
    """Noise for this round, calibrated so that it and the policy rounds still planned
    fit the whole budget after everything already spent (the reward phase included).

    PPO: each iteration is one Poisson sample of prompts, and each rollout enters
    ``ppo_epochs`` noisy steps (:func:`dp_event_per_iteration`); DPO: one step each.
    """
    pc: PolicyConfig = config.policy
    repeats = pc.ppo_epochs if pc.objective == "ppo" else 1
    ledger = store.ledger()
    previous = (
        ledger[-1].event.noise_multiplier if ledger and ledger[-1].phase == "policy" else None
    )
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
