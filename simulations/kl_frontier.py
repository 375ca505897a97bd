"""The KL-optimal frontier of the synthetic world: the most true utility any policy
can gain over the reference at a given KL to it.

Of all policies within KL ``c`` of the reference, the one with the highest expected
utility is the reference tilted by ``exp(utility / t)``, ``t`` set so that its KL is
``c`` (the Gibbs variational principle; it is also the optimum PPO's and DPO's
KL-regularized objective aims at, with ``t = beta`` and the true utility as reward).
The frontier is estimated from ``samples`` reference responses per held-out prompt,
reweighted: per prompt, ``w = softmax(u / t)`` over its samples, the gain is
``sum(w u) - mean(u)`` and the KL ``sum(w log(samples w))``, both averaged over
prompts. Reweighting can only pick among the samples drawn, so the estimate is a
lower bound on the true frontier that tightens with ``samples`` (and caps the KL at
``log samples``): a policy's share of it is, if anything, flattered.

Tilting the same samples by the federation's reward model instead of the truth gives
the true utility that exactly optimizing the reward model would buy at each KL: the
gap between the two curves is the reward model's, the gap between the second and a
policy the optimizer's (and its DP noise's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.ppo_training import SamplingSettings, ScoreFn, generate_rollouts
from common.policy_model import PolicyModel

FRONTIER_SAMPLES = 32
"""Reference responses per held-out prompt."""
FRONTIER_SEED = 54321
PROMPTS_PER_BATCH = 16
TEMPERATURES = np.geomspace(1e-3, 1e3, 121)


@dataclass(frozen=True)
class Frontier:
    kl: np.ndarray
    """Nats per response, increasing from 0."""
    gain: np.ndarray
    """True-utility gain over the reference's mean at that KL."""

    def gain_at(self, kl: float) -> float:
        """The frontier's gain at ``kl`` (its last point past the largest KL estimated)."""
        return float(np.interp(kl, self.kl, self.gain))

    @classmethod
    def from_json(cls, points: list[dict[str, float]]) -> Frontier:
        return cls(np.array([p["kl"] for p in points]), np.array([p["gain"] for p in points]))

    def to_json(self, sd: float, points: int = 25) -> list[dict[str, float]]:
        """A few points of the frontier, the gain also in reference SDs."""
        pick = np.unique(np.linspace(0, len(self.kl) - 1, points).round().astype(int))
        return [
            {
                "kl": float(self.kl[i]),
                "gain": float(self.gain[i]),
                "gain_in_sd": float(self.gain[i] / sd),
            }
            for i in pick
        ]


def tilted_frontier(utilities: np.ndarray, tilt_by: np.ndarray | None = None) -> Frontier:
    """The frontier from ``[prompts, samples]`` true utilities of reference responses.

    With ``tilt_by`` (e.g. the reward model's scores of the same responses) the reference
    is tilted by ``exp(tilt_by / t)`` instead, and the curve is the true utility such a
    policy gains: what exactly optimizing that reward would buy, at each KL.
    """
    u = np.asarray(utilities, dtype=np.float64)
    by = u if tilt_by is None else np.asarray(tilt_by, dtype=np.float64)
    n = u.shape[1]
    kls, gains = [0.0], [0.0]
    for t in TEMPERATURES[::-1]:  # hot (near the reference) to cold (the best sample)
        logits = by / t
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
        kl = np.where(w > 0, w * np.log(np.maximum(w * n, 1e-300)), 0.0).sum(axis=1).mean()
        gain = ((w * u).sum(axis=1) - u.mean(axis=1)).mean()
        if kl > kls[-1] and (tilt_by is not None or gain > gains[-1]):
            kls.append(float(kl))
            gains.append(float(gain))
    return Frontier(np.array(kls), np.array(gains))


@torch.no_grad()
def reference_samples(
    policy: PolicyModel,
    tokenizer,  # noqa: ANN001
    prompts: list[str],
    utility,  # noqa: ANN001
    score_fn: ScoreFn,
    sampling: SamplingSettings,
    samples: int = FRONTIER_SAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
    """``[prompts, samples]`` true utilities and reward-model scores of the reference's
    (adapters off) responses."""
    responses: list[str] = []
    scores: list[torch.Tensor] = []
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        batch = [p for p in prompts[start : start + PROMPTS_PER_BATCH] for _ in range(samples)]
        rollouts = generate_rollouts(
            policy, tokenizer, batch, score_fn, sampling, FRONTIER_SEED + start, reference=True
        )
        responses += rollouts.responses
        scores.append(rollouts.scores.cpu())
    values = [utility(prompts[i // samples], r) for i, r in enumerate(responses)]
    shape = (len(prompts), samples)
    return np.array(values).reshape(shape), torch.cat(scores).double().numpy().reshape(shape)
