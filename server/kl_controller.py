"""The KL coefficient beta the coordinator sends with each policy round.

Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences": a
proportional controller steers the observed KL to the reference towards a target,

    error = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)

where ``n_steps`` counts the rollouts behind the observation. In the federation the
observed KL is the aggregate (mean over the round's clients, through SecAgg+).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ERROR_CLIP = 0.2


@dataclass
class AdaptiveKLController:
    beta: float
    target: float
    horizon: float

    def update(self, observed_kl: float, n_steps: int) -> float:
        """Move beta after a round with mean KL ``observed_kl`` over ``n_steps`` rollouts."""
        error = min(max(observed_kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FixedKLController:
    """A constant beta (``policy.kl-control = "fixed"``)."""

    beta: float

    def update(self, observed_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return asdict(self)
