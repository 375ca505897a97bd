"""One client's part in a reward round: evaluate, budget, train with DP, report.

Given the global adapter + head, the client (1) evaluates them on its held-out
comparisons, (2) picks the noise multiplier that keeps its whole planned run within
its epsilon budget, or declines, (3) records the charge in its ledger *before*
training, (4) trains with DP-SGD, and (5) returns the update (new - global) and the
whitelisted statistics, both to be masked by SecAgg+.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from functools import lru_cache

import numpy as np
import torch

from client.reward_training import DPSettings, OptimizerSettings, train_reward_model
from client.round_timeline import timed
from client.store import PreferenceStore
from common.config import ModelConfig, RunConfig
from common.dp_randomness import randomness_name
from common.hardware import model_device
from common.losses import bradley_terry_loss
from common.model import (
    REWARD_ADAPTER,
    RewardModel,
    build_reward_model,
    encode_pairs,
    load_base,
    score_pairs,
    train_only,
)
from common.privacy import (
    BudgetExceeded,
    DPEvent,
    accountant_for,
    calibrate_noise_multiplier,
    check_budget,
    epsilon,
    planned_steps,
)
from common.protocol import RoundInstruction
from common.wire import MAX_COUNT, REWARD_STATS, TensorSpec, from_ndarrays, pack_update, spec_of

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cached_reward_model(model_config: ModelConfig) -> tuple[RewardModel, object]:
    """One base + reward adapter per process; every round overwrites the adapter.

    A SuperNode starts a fresh ClientApp process for each message (Flower 1.41), so in
    a deployment this loads once per round that trains (the SecAgg+ key-exchange
    stages never get here); a simulation's actors keep it for the whole run."""
    start = time.perf_counter()
    base, tokenizer = load_base(model_config.base, config=model_config)
    log.info(
        "loaded base %s on %s in %s (%.1fM parameters) in %.1f s, process %d",
        model_config.base, model_device(base), base.dtype,
        base.num_parameters() / 1e6, time.perf_counter() - start, os.getpid(),
    )  # fmt: skip
    return build_reward_model(base, model_config), tokenizer


def reward_spec(model: RewardModel) -> list[TensorSpec]:
    return spec_of(model.trainable_state())


def _encode(tokenizer, comparisons, max_length: int):
    return encode_pairs(
        tokenizer,
        [c.prompt for c in comparisons],
        [c.chosen for c in comparisons],
        [c.rejected for c in comparisons],
        max_length,
    )


def _evaluate(model: RewardModel, tokenizer, comparisons, max_length: int) -> dict[str, float]:
    comparisons = comparisons[: int(MAX_COUNT)]
    if not comparisons:
        return {"eval_pairs": 0.0, "eval_correct": 0.0, "eval_loss_sum": 0.0}
    margins = score_pairs(model, _encode(tokenizer, comparisons, max_length))
    loss = bradley_terry_loss(margins, torch.zeros_like(margins)) * len(margins)
    return {
        "eval_pairs": float(len(margins)),
        "eval_correct": float((margins > 0).sum()),
        "eval_loss_sum": float(loss),
    }


def reward_round(
    config: RunConfig,
    store: PreferenceStore,
    instruction: RoundInstruction,
    global_arrays: list[np.ndarray],
    run_id: str,
    where: str,
) -> list[np.ndarray]:
    """Run the client's part of a reward round; returns the arrays to be masked."""
    with timed("load"):
        model, tokenizer = cached_reward_model(config.model)
    spec = reward_spec(model)
    global_state = from_ndarrays(global_arrays, spec, where)  # refuses bad names/shapes/NaN
    model.load_trainable_state(global_state)
    train_only(model, REWARD_ADAPTER, ("head.",))

    with timed("evaluate"):
        held_out = store.comparisons("heldout", config.reward.heldout_fraction)
        stats = _evaluate(model, tokenizer, held_out, config.model.max_length)
    stats.update(train_examples=0.0, train_steps=0.0, train_loss=0.0)
    spent = store.privacy_events()
    stats["epsilon"] = epsilon(spent, config.privacy.delta, config.privacy.accountant)

    if instruction.task == "evaluate":
        return pack_update(
            {}, [], REWARD_STATS.encode(stats), config.federation.secagg_clipping_range
        )

    with timed("encode"):
        train = store.comparisons("train", config.reward.heldout_fraction)
        if not train:
            raise ValueError(f"{where}: the store {store.path} holds no training comparisons")
        pairs = _encode(tokenizer, train, config.model.max_length)
    sample_rate, steps = planned_steps(
        len(pairs), config.reward.batch_size, config.reward.local_epochs
    )
    seed = round_seed(instruction, store)

    dp = None
    charge = None
    if config.privacy.enabled:
        with timed("plan noise"):
            noise = _noise_multiplier(config, spent, sample_rate, steps, instruction)
            event = DPEvent(noise, sample_rate, steps)
            stats["epsilon"] = check_budget(
                spent, event, config.reward_epsilon, config.privacy.delta, config.privacy.accountant
            )
        charge = begin_round_charge(store, run_id, instruction, event, config)
        dp = DPSettings(noise, config.privacy.max_grad_norm, config.privacy.secure_noise)

    with timed("train"):
        result = train_reward_model(
            model,
            pairs,
            steps=steps,
            batch_size=config.reward.batch_size,
            optimizer=OptimizerSettings.of(config.reward),
            dp=dp,
            accountant=accountant_for(spent, config.privacy.accountant) if dp else None,
            seed=seed,
        )
    if charge is not None:
        store.commit_charge(charge, result.steps)
    log.info(
        "%s: reward round %d trained %d steps on %d comparisons, loss %.4f, epsilon %.3f%s",
        where,
        instruction.round,
        result.steps,
        len(pairs),
        result.mean_loss,
        stats["epsilon"],
        "" if dp else " (DP OFF)",
    )
    new_state = model.trainable_state()
    update = {name: new_state[name].detach().cpu() - global_state[name] for name in global_state}
    stats.update(
        train_examples=float(min(len(pairs), MAX_COUNT)),
        train_steps=float(result.steps),
        train_loss=result.mean_loss,
    )
    return pack_update(
        update, spec, REWARD_STATS.encode(stats), config.federation.secagg_clipping_range
    )


def begin_round_charge(
    store: PreferenceStore,
    run_id: str,
    instruction: RoundInstruction,
    event: DPEvent,
    config: RunConfig,
) -> int:
    """Charge a round's DP run to the ledger before it trains, with its randomness."""
    return store.begin_charge(
        run_id,
        instruction.phase,
        instruction.round,
        event,
        randomness_name(config.privacy.secure_noise),
    )


def round_seed(instruction: RoundInstruction, store: PreferenceStore) -> int:
    """A per-client, per-round seed (run seed, phase, round, attempt, store): reproducible
    runs, a retried round draws afresh, and no two clients share noise."""
    parts = (
        instruction.seed,
        instruction.phase,
        instruction.round,
        instruction.attempt,
        store.path.resolve(),
    )
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**62


def _noise_multiplier(
    config: RunConfig,
    spent: list[DPEvent],
    sample_rate: float,
    steps: int,
    instruction: RoundInstruction,
) -> float:
    """Fixed, or calibrated so this round and the remaining planned ones fit the budget."""
    if config.privacy.noise == "fixed":
        return config.privacy.noise_multiplier
    remaining = instruction.rounds - instruction.round + 1
    try:
        return calibrate_noise_multiplier(
            spent,
            [(sample_rate, steps)] * remaining,
            config.reward_epsilon,
            config.privacy.delta,
            config.privacy.accountant,
            previous=spent[-1].noise_multiplier if spent else None,
        )
    except BudgetExceeded as exc:
        raise BudgetExceeded(f"declining reward round {instruction.round}: {exc}") from None
