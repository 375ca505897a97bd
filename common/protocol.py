"""The round instruction the server sends with the global arrays, defined once.

It travels in the legacy ``FitIns.config`` (SecAgg+ is shipped on Flower's legacy
path), so it is a flat dict of scalars. Clients validate it before doing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.wire import WireError

PROTOCOL_VERSION = 1
PHASES = ("reward", "policy")
TASKS = ("train", "measure", "evaluate")


@dataclass(frozen=True)
class RoundInstruction:
    phase: str
    """Which model the round trains: ``reward`` or ``policy``."""
    task: str
    """``train``: evaluate the incoming model on held-out data, then train and send the
    update. ``measure`` (policy rounds): measure the candidate the server sends, the
    aggregate of this round's updates, for the trust region. ``evaluate``: only
    evaluate (the final model of a phase)."""
    round: int
    """1-based round within the phase."""
    rounds: int
    """Rounds planned for the phase; clients plan their privacy budget with it."""
    attempt: int
    """1 for a round's first try, 2, 3 for retries of a failed one."""
    server_round: int
    """Run-wide counter across phases and attempts, never reused (also not by a
    restarted server); a client refuses one at or below the last it served."""
    run_key: str
    """Random name the server gave this run: the scope of ``server_round``."""
    seed: int
    """The run's seed; clients derive theirs from it, the phase, round and attempt."""
    beta: float = 0.0
    """The KL coefficient of a PPO round (set by the server's KL controller)."""
    protocol: int = PROTOCOL_VERSION

    def to_config(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> RoundInstruction:
        """Parse and check; errors name the field and ``where`` it arrived."""
        expected = {
            "phase": str,
            "task": str,
            "round": int,
            "rounds": int,
            "attempt": int,
            "server_round": int,
            "run_key": str,
            "seed": int,
            "beta": float,
            "protocol": int,
        }
        values: dict[str, Any] = {}
        for name, kind in expected.items():
            if name not in config:
                raise WireError(f"{where}: round instruction lacks field {name!r}")
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise WireError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}")
            values[name] = value
        instruction = cls(**values)
        if instruction.protocol != PROTOCOL_VERSION:
            raise WireError(
                f"{where}: protocol version {instruction.protocol}, this client speaks {PROTOCOL_VERSION}"
            )
        if instruction.phase not in PHASES:
            raise WireError(f"{where}: unknown phase {instruction.phase!r}")
        if instruction.task not in TASKS:
            raise WireError(f"{where}: unknown task {instruction.task!r}")
        if instruction.task == "measure" and instruction.phase != "policy":
            raise WireError(f"{where}: task 'measure' belongs to policy rounds only")
        if not (0.0 <= instruction.beta < float("inf")):
            raise WireError(
                f"{where}: field 'beta' must be finite and >= 0, got {instruction.beta}"
            )
        if instruction.attempt < 1 or instruction.server_round < 1 or not instruction.run_key:
            raise WireError(f"{where}: attempt, server_round and run_key must be set")
        if not 1 <= instruction.round <= instruction.rounds:
            raise WireError(f"{where}: round {instruction.round} outside 1..{instruction.rounds}")
        return instruction
