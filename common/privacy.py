"""Differential-privacy accounting composed over a client's whole history.

A client's privacy loss is the composition of every DP-SGD run on its data: each
round, each phase, each earlier run on the same store. We keep that history as a
list of :class:`DPEvent` (noise multiplier, Poisson sample rate, steps), persisted in
the client's ledger, and hand it to an Opacus accountant whenever an epsilon is
needed. Nothing here knows about rounds or phases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.optimize import brentq

MAX_NOISE_MULTIPLIER = 1e3
PRV_RELATIVE_ERROR = 1e-3
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, 128, 256, 512, 1024]
"""Opacus's Renyi orders plus the large ones Google's dp-accounting also uses: a small
epsilon (a statistics release, under 0.2 at delta 1e-5) is reached only at orders past
Opacus's largest, 63."""


class BudgetExceeded(RuntimeError):
    """Training would push a client past its epsilon budget; the client declines."""


class RoundDeclined(RuntimeError):
    """What a client's error reply says when it declines for its budget: that it did,
    in a constant text. The figures (epsilon spent, planned) depend on its data and
    history, so they stay in its own log."""

    MESSAGE = "declined: the round would exceed this client's privacy budget"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


@dataclass(frozen=True)
class DPEvent:
    """``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merge_events(events: Sequence[DPEvent]) -> list[DPEvent]:
    """Events with the same noise and sample rate, merged into one with summed steps.

    Composition only depends on the multiset of steps, so this changes no epsilon;
    it makes accounting a long history cost one evaluation per distinct setting.
    """
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            key = (e.noise_multiplier, e.sample_rate)
            steps[key] = steps.get(key, 0) + e.steps
    return [DPEvent(sigma, q, n) for (sigma, q), n in steps.items()]


def accountant_for(events: Sequence[DPEvent], kind: str = "rdp") -> IAccountant:
    """An Opacus accountant whose history is ``events``; training appends to it."""
    accountant = create_accountant(kind)
    accountant.history = [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in merge_events(events)
    ]
    return accountant


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at each of Opacus's orders. A step costs about 0.1 s to account
    (a series per fractional order); composition is linear in steps, so one vector per
    (noise, rate) serves every history and every candidate of a calibration."""
    return rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
    )


def epsilon(events: Sequence[DPEvent], delta: float, kind: str = "rdp") -> float:
    """Composed epsilon of all ``events`` at ``delta`` (0 for no events).

    ``rdp`` is exactly Opacus's RDPAccountant at :data:`RDP_ORDERS` (same conversion),
    computed from cached per-step RDP vectors; other kinds go through Opacus's
    accountant."""
    merged = merge_events(events)
    if not merged:
        return 0.0
    if kind == "prv":
        # Opacus's PRV bound is off by at most eps_error (absolute): keep it to 0.1%
        # of the figure (RDP bounds PRV's from above, and costs nothing to get).
        error = PRV_RELATIVE_ERROR * max(1.0, epsilon(merged, delta, "rdp"))
        return float(accountant_for(merged, kind).get_epsilon(delta=delta, eps_error=error))
    if kind != "rdp":
        return float(accountant_for(merged, kind).get_epsilon(delta=delta))
    rdp = sum(e.steps * _rdp_per_step(e.noise_multiplier, e.sample_rate) for e in merged)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def planned_steps(num_examples: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Poisson sample rate and number of steps for ``epochs`` expected passes.

    The rate is Opacus's: ``1 / len(DataLoader(batch_size))``, the rate its
    DPDataLoader samples at and its accountant records.
    """
    if num_examples <= 0:
        raise ValueError("no training examples")
    sample_rate = 1.0 / math.ceil(num_examples / batch_size)
    return sample_rate, max(1, round(epochs / sample_rate))


def calibrate_noise_multiplier(
    spent: Sequence[DPEvent],
    planned: Sequence[tuple[float, int]],
    budget: float,
    delta: float,
    kind: str = "rdp",
    tolerance: float = 1e-3,
    previous: float | None = None,
) -> float:
    """Smallest noise multiplier with which ``spent`` + ``planned`` stays within ``budget``.

    ``planned`` lists (sample rate, steps) of every run still to come, this one
    first, all at the one noise multiplier returned. ``previous`` (the multiplier
    of the last round) is kept while the plan still fits with it, so a client that
    takes part in every round trains at one noise level throughout. Raises
    :class:`BudgetExceeded` when no noise level fits (the budget is already spent).
    """

    def total(sigma: float) -> float:
        return epsilon([*spent, *(DPEvent(sigma, q, s) for q, s in planned)], delta, kind)

    if previous is not None and total(previous) <= budget:
        return previous
    if epsilon(spent, delta, kind) >= budget:
        raise BudgetExceeded(
            f"epsilon already spent {epsilon(spent, delta, kind):.3f} >= budget {budget}"
        )
    # Bracket the root (total falls as sigma grows), then Brent's method on log sigma:
    # about 6 accountings where bisection to the same tolerance takes 12-20.
    high = previous or 1.0
    while total(high) > budget:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetExceeded(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {budget}"
            )
    low = high / 2
    while low > 1e-3 and total(low) <= budget:
        low, high = low / 2, low
    log_sigma = brentq(
        lambda x: total(math.exp(x)) - budget, math.log(low), math.log(high), xtol=tolerance / 4
    )
    sigma = math.exp(log_sigma)
    while total(sigma) > budget:  # brentq's answer may sit a hair on the wrong side
        sigma *= 1 + tolerance / 4
    return sigma


def check_budget(
    spent: Sequence[DPEvent],
    next_events: Sequence[DPEvent],
    budget: float,
    delta: float,
    kind: str = "rdp",
) -> float:
    """Epsilon after ``next_events``; raises :class:`BudgetExceeded` if above ``budget``."""
    after = epsilon([*spent, *next_events], delta, kind)
    if after > budget * (1 + 1e-6) or math.isnan(after):
        before = epsilon(spent, delta, kind)
        raise BudgetExceeded(
            f"this round would raise epsilon from {before:.3f} to {after:.3f}, "
            f"above the budget of {budget} (delta={delta:g})"
        )
    return after
