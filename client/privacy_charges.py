"""A round's DP mechanisms, checked against the budget and charged before they run.

Every value a client sends that depends on its data comes out of one of these: the
DP-SGD run that made its update (``training``) or the noised release of its figures
(``statistics``). Both are charged to the ledger in full *before* they run, so a
client that dies mid-round never counts less than it spent; a finished mechanism is
committed with what it actually used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.store import PreferenceStore
from common.config import RunConfig
from common.dp_randomness import DPRandomness, randomness_name
from common.dp_statistics import clipped_sums, noised
from common.privacy import DPEvent, check_budget
from common.protocol import RoundInstruction
from common.wire import StatsLayout


@dataclass(frozen=True)
class Mechanism:
    event: DPEvent
    kind: str
    """``training`` or ``statistics`` (:data:`client.store.MECHANISMS`)."""
    unit: str
    """``comparison`` or ``prompt`` (:data:`client.store.UNITS`)."""


def phase_budget(config: RunConfig, phase: str) -> float:
    """The epsilon a phase may reach: the reward phase its share, the policy phase all."""
    return config.reward_epsilon if phase == "reward" else config.privacy.epsilon


def begin_charges(
    store: PreferenceStore,
    run_id: str,
    instruction: RoundInstruction,
    config: RunConfig,
    mechanisms: Sequence[Mechanism],
) -> tuple[list[int], float]:
    """Charge ``mechanisms`` if together they fit the phase's budget; returns their
    ledger ids and the epsilon after them. Raises :class:`BudgetExceeded` otherwise."""
    after = check_budget(
        store.privacy_events(),
        [m.event for m in mechanisms],
        phase_budget(config, instruction.phase),
        config.privacy.delta,
        config.privacy.accountant,
    )
    randomness = randomness_name(config.privacy.secure_noise)
    ids = [
        store.begin_charge(
            run_id,
            instruction.phase,
            instruction.round,
            m.event,
            randomness,
            m.kind,
            m.unit,
        )
        for m in mechanisms
    ]
    return ids, after


def release_statistics(
    store: PreferenceStore,
    rows: np.ndarray,
    layout: StatsLayout,
    event: DPEvent | None,
    randomness: DPRandomness,
    charge: int | None,
) -> np.ndarray:
    """The stats array of a reply: per-unit ``rows`` clipped and summed, then noised for
    the charged statistics ``event`` and its charge committed (``event`` None: DP off)."""
    sums = clipped_sums(rows, layout)
    if event is not None:
        sums = noised(sums, layout, event.noise_multiplier, randomness)
        store.commit_charge(charge, 1)
    return layout.encode(sums)
