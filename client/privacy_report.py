"""A partner's privacy audit: every mechanism its ledger charged, composed two ways.

``fedrlhf privacy-report --store PATH`` lists each charge (run, phase, round, mechanism,
unit, noise multiplier, Poisson rate, steps, status, randomness) and composes epsilon
over the whole ledger and over subsets of it (by phase, by mechanism, by unit) with two
accountants: Renyi DP (what the rounds enforce) and Opacus's PRV accountant (an upper
bound from the privacy-loss distribution, tighter by about 10%). A figure never stands
without the accountant beside it.

What a subset's epsilon means: the whole-ledger figure is the guarantee for one
comparison (it touches its prompt, so every mechanism composes on it) and the one the
budget caps. The ``prompt`` subset alone is what a prompt's presence costs in the
mechanisms that read prompts; a prompt shared by many comparisons is covered by the
comparison mechanisms only as a group of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from client.store import LedgerEntry, PreferenceStore
from common.privacy import DPEvent, epsilon

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class Composition:
    subset: str
    """``all``, ``phase=reward``, ``mechanism=statistics``, ``unit=prompt``, ..."""
    mechanisms: int
    epsilon: dict[str, float]
    """Accountant name -> epsilon of these mechanisms composed."""


def _compose(name: str, entries: list[LedgerEntry], delta: float) -> Composition:
    events: list[DPEvent] = [e.event for e in entries]
    return Composition(name, len(entries), {k: epsilon(events, delta, k) for k in ACCOUNTANTS})


def privacy_report(store: PreferenceStore, delta: float) -> dict[str, Any]:
    """Every charge of ``store``'s ledger and the compositions, as plain data."""
    ledger = store.ledger()
    subsets = [("all", ledger)]
    for field in ("phase", "mechanism", "unit"):
        for value in dict.fromkeys(getattr(e, field) for e in ledger):
            subsets.append((f"{field}={value}", [e for e in ledger if getattr(e, field) == value]))
    return {
        "store": str(store.path),
        "delta": delta,
        "mechanisms": [
            {
                "id": e.id,
                "run_id": e.run_id,
                "phase": e.phase,
                "round": e.round,
                "mechanism": e.mechanism,
                "unit": e.unit,
                "noise_multiplier": e.event.noise_multiplier,
                "sample_rate": e.event.sample_rate,
                "steps": e.event.steps,
                "status": e.status,
                "randomness": e.randomness,
            }
            for e in ledger
        ],
        "compositions": [asdict(_compose(name, entries, delta)) for name, entries in subsets],
        "pending_counted_in_full": sum(e.status == "pending" for e in ledger),
    }
