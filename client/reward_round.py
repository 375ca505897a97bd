"""One client's part in a reward round: budget, train with DP, send the update.

Given the global adapter + head, the client (1) picks the noise multiplier that keeps
its whole planned run within its epsilon budget (the statistics still to be released
counted in), or declines, (2) charges the run to its ledger *before* training, (3)
trains with DP-SGD, and (4) returns the update (new - global), to be masked by SecAgg+.
A training round sends nothing else. The phase's final evaluation sends the held-out
figures of the final model instead, noised and charged (:mod:`common.dp_statistics`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from client.privacy_charges import Mechanism, begin_charges, release_statistics
from client.reward_training import DPSettings, OptimizerSettings, train_reward_model
from client.round_timeline import timed
from client.store import PreferenceStore
from common.config import ModelConfig, RunConfig
from common.dp_randomness import dp_randomness
from common.dp_statistics import STATISTICS, future_statistics, statistics_event
from common.hardware import model_device
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
    epsilon,
    planned_steps,
)
from common.protocol import RoundInstruction
from common.wire import REWARD_STATS, TensorSpec, from_ndarrays, pack_update, spec_of

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


def evaluation_rows(model: RewardModel, tokenizer, comparisons, max_length: int) -> np.ndarray:
    """One row per held-out comparison: (1, whether the model ranks it right, its
    Bradley-Terry loss), in :data:`REWARD_STATS` order."""
    if not comparisons:
        return np.zeros((0, len(REWARD_STATS.fields)))
    margins = score_pairs(model, _encode(tokenizer, comparisons, max_length)).double()
    return torch.stack(
        [torch.ones_like(margins), (margins > 0).double(), F.softplus(-margins)], dim=1
    ).numpy()


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
    if instruction.task == "evaluate":
        return _release_evaluation(config, store, instruction, model, tokenizer, run_id)

    with timed("encode"):
        train = store.comparisons("train", config.reward.heldout_fraction)
        if not train:
            raise ValueError(f"{where}: the store {store.path} holds no training comparisons")
        pairs = _encode(tokenizer, train, config.model.max_length)
    sample_rate, steps = planned_steps(
        len(pairs), config.reward.batch_size, config.reward.local_epochs
    )
    spent = store.privacy_events()
    after = epsilon(spent, config.privacy.delta, config.privacy.accountant)
    dp, charge = None, None
    if config.privacy.enabled:
        with timed("plan noise"):
            coming = future_statistics(config, instruction, store.counts()["prompts"])
            noise = _noise_multiplier(
                config, store, [*spent, *coming], sample_rate, steps, instruction
            )
        (charge,), after = begin_charges(
            store, run_id, instruction, config,
            [Mechanism(DPEvent(noise, sample_rate, steps), "training", "comparison")],
        )  # fmt: skip
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
            seed=round_seed(instruction, store),
        )
    if charge is not None:
        store.commit_charge(charge, result.steps)
    log.info(
        "%s: reward round %d trained %d steps on %d comparisons, loss %.4f, epsilon %.3f%s",
        where, instruction.round, result.steps, len(pairs), result.mean_loss, after,
        "" if dp else " (DP OFF)",
    )  # fmt: skip
    new_state = model.trainable_state()
    update = {name: new_state[name].detach().cpu() - global_state[name] for name in global_state}
    # A training round sends its update only: its loss and sizes stay here (logged).
    return pack_update(update, spec, None, config.federation.secagg_clipping_range)


def _release_evaluation(
    config: RunConfig,
    store: PreferenceStore,
    instruction: RoundInstruction,
    model: RewardModel,
    tokenizer,  # noqa: ANN001
    run_id: str,
) -> list[np.ndarray]:
    """The final model's figures on the held-out comparisons, noised and charged."""
    event, charge = None, None
    if config.privacy.enabled:
        event = statistics_event(config, instruction, store.counts()["prompts"])
        (charge,), _ = begin_charges(
            store, run_id, instruction, config, [Mechanism(event, STATISTICS, "comparison")]
        )
    with timed("evaluate"):
        held_out = store.comparisons("heldout", config.reward.heldout_fraction)
        rows = evaluation_rows(model, tokenizer, held_out, config.model.max_length)
    seed = round_seed(instruction, store, STATISTICS)
    randomness = dp_randomness(config.privacy.secure_noise, torch.device("cpu"), seed)
    stats = release_statistics(store, rows, REWARD_STATS, event, randomness, charge)
    return pack_update({}, [], stats, config.federation.secagg_clipping_range)


def round_seed(instruction: RoundInstruction, store: PreferenceStore, purpose: str = "") -> int:
    """A per-client, per-round seed (run seed, phase, round, attempt, store, purpose):
    reproducible runs, a retried round draws afresh, no two clients share noise, and
    each ``purpose`` (e.g. the statistics' noise) draws a stream of its own."""
    parts = (
        instruction.seed,
        instruction.phase,
        instruction.round,
        instruction.attempt,
        store.path.resolve(),
        *([purpose] if purpose else []),
    )
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**62


def _noise_multiplier(
    config: RunConfig,
    store: PreferenceStore,
    committed: list[DPEvent],
    sample_rate: float,
    steps: int,
    instruction: RoundInstruction,
) -> float:
    """Fixed, or calibrated so this round and the remaining planned ones fit the budget
    after ``committed`` (what was spent, and the statistics still to be released)."""
    if config.privacy.noise == "fixed":
        return config.privacy.noise_multiplier
    remaining = instruction.rounds - instruction.round + 1
    try:
        return calibrate_noise_multiplier(
            committed,
            [(sample_rate, steps)] * remaining,
            config.reward_epsilon,
            config.privacy.delta,
            config.privacy.accountant,
            previous=last_training_noise(store, "reward"),
        )
    except BudgetExceeded as exc:
        raise BudgetExceeded(f"declining reward round {instruction.round}: {exc}") from None


def last_training_noise(store: PreferenceStore, phase: str) -> float | None:
    """The noise multiplier of the phase's last DP-SGD run on this store, if any."""
    runs = [e for e in store.ledger() if e.mechanism == "training" and e.phase == phase]
    return runs[-1].event.noise_multiplier if runs else None
