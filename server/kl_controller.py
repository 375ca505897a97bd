"""The KL coefficient beta the coordinator sends with each policy round.

Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences": a
proportional controller steers the observed KL to the reference towards a target,

    error = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)

where ``n_steps`` counts the rollouts behind the observation. In the federation the
observed KL is the aggregate (mean over the round's clients, through SecAgg+).
"""

from __future__ import annotations

import math
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


TRUST_REGION_MODES = ("scale", "reject", "shrink")


@dataclass(frozen=True)
class TrustRegionDecision:
    scale: float
    """Multiplier for the aggregated update: 1 (as is), in (0, 1) (scaled back), 0 (rejected)."""
    reason: str
    shrink: float = 1.0
    """Multiplier for the stepped policy's distance from the reference (``shrink`` mode)."""

    def predicted_kl(self, kl_current: float, kl_proposed: float) -> float:
        """The new global policy's KL, by the model each mode assumes: a straight line
        along the step, and KL quadratic in the distance from the reference when shrunk."""
        return (kl_current + self.scale * (kl_proposed - kl_current)) * self.shrink**2


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
    scaled-back policy stays within the bound. Both stop the policy for good once it
    sits at the bound: every step from there leads out.

    ``mode="shrink"`` takes the whole step, then pulls the policy towards the reference
    (every adapter delta times ``sqrt(bound / kl_proposed)``: KL is quadratic in a small
    delta) until it is back at the bound. The step's direction is kept, so a policy at
    the bound still moves: what the rounds agree on builds up, while DP noise, which
    points anywhere, is shrunk away like weight decay.
    """
    if mode not in TRUST_REGION_MODES:
        raise ValueError(
            f"trust-region mode must be one of {', '.join(TRUST_REGION_MODES)}, got {mode!r}"
        )
    if kl_proposed <= bound:
        return TrustRegionDecision(1.0, f"KL {kl_proposed:.4g} within the bound {bound:.4g}")
    if mode == "shrink":
        shrink = math.sqrt(bound / kl_proposed)
        return TrustRegionDecision(
            1.0,
            f"shrunk by {shrink:.3f} towards the reference: KL {kl_proposed:.4g} would pass "
            f"the bound {bound:.4g}",
            shrink,
        )
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
