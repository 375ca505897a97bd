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
        # A round of more samples than the horizon closes the error once, not more
        # (past that the factor could reach 0 or below and beta would flip sign).
        self.beta *= 1.0 + error * min(1.0, n_steps / self.horizon)
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


@dataclass(frozen=True)
class TrustRegionDecision:
    scale: float
    """Multiplier for the aggregated update: 1 (as is), in (0, 1) (scaled back), 0 (rejected)."""
    reason: str


def trust_region(
    kl_current: float, kl_proposed: float, bound: float, mode: str
) -> TrustRegionDecision:
    """Keep the federation's policy within ``bound`` of the reference.

    ``kl_current`` is the KL to the reference of the global policy the round started
    from, ``kl_proposed`` that of the clients' updated policies (aggregated through
    SecAgg+). Within the bound the step is taken. Past it, ``mode="reject"`` drops the
    round; ``mode="scale"`` takes the fraction ``s`` of the step at which the straight
    line between the two KL values meets the bound: if KL is convex along the step
    (it is in a policy's natural parameters), the line lies above it, so the
    scaled-back policy stays within the bound.
    """
    if mode not in ("scale", "reject"):
        raise ValueError(f"trust-region mode must be 'scale' or 'reject', got {mode!r}")
    if kl_proposed <= bound:
        return TrustRegionDecision(1.0, f"KL {kl_proposed:.4g} within the bound {bound:.4g}")
    if kl_proposed < kl_current:
        return TrustRegionDecision(
            1.0, f"KL {kl_proposed:.4g} still past the bound {bound:.4g}, but moving back"
        )
    if mode == "reject" or kl_current >= bound:
        return TrustRegionDecision(
            0.0, f"rejected: KL {kl_proposed:.4g} would pass the bound {bound:.4g}"
        )
    scale = (bound - kl_current) / (kl_proposed - kl_current)
    return TrustRegionDecision(
        scale, f"scaled by {scale:.3f}: KL {kl_proposed:.4g} would pass the bound {bound:.4g}"
    )
