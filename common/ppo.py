"""The math of KL-regularized PPO on language models, one pure function per idea.

Shapes: ``[batch, tokens]`` for per-token quantities of the generated responses,
with ``mask`` 1 on response tokens and 0 on padding after the end. In the spirit of
CleanRL: every detail is a named function here, and the trainer only composes them.

Symbols: ``logp`` log-probability of a generated token under the policy being
trained, ``logp_old`` under the policy that generated it (rollout time),
``logp_ref`` under the reference (base model, adapter off), ``beta`` the KL
coefficient, ``gamma``/``lam`` the discount and GAE parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k3")
ADVANTAGES = ("gae", "rloo", "grpo")
"""``gae``: a learned value head (PPO). ``rloo`` and ``grpo``: critic-free, the baseline
of a response is the other responses to the same prompt."""
KL_PENALTIES = ("reward", "loss")
"""Where beta * KL enters: subtracted from the reward (Ziegler et al., PPO, RLOO), or
added to the loss as a per-token k3 term (GRPO, Shao et al. 2024)."""
GRPO_STD_EPS = 1e-4


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's masked token mean.

    The loss under DP: each rollout's loss depends on its own tokens only, so its
    per-sample gradient is its own (a batch-wide token mean would scale it by the
    other rollouts' lengths).
    """
    return ((x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize to unit variance over the masked entries (zero mean if ``shift_mean``).

    Advantages are whitened with the mean removed; PPO implementations keep the mean
    when whitening rewards, so that a reward's sign survives.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    ``k1 = log p - log p_ref``: unbiased, can be negative per token.
    ``k3 = (r - 1) - log r`` with ``r = p_ref / p``: unbiased, never negative, lower
    variance (Schulman, "Approximating KL divergence", 2020).
    """
    log_ratio = logp - logp_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def shaped_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    ended: torch.Tensor,
    beta: float,
    missing_eos_penalty: float,
) -> torch.Tensor:
    """Per-token rewards: ``-beta * kl`` everywhere, plus the reward model's score on
    the last response token; a response that never produced an end-of-sequence token
    has ``missing_eos_penalty`` subtracted from its score."""
    rewards = -beta * kl * mask
    # The last masked position (responses may start after a left-padded prompt).
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
    final = scores - missing_eos_penalty * (~ended).float()
    rewards[torch.arange(len(scores), device=rewards.device), last] += final
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation; returns (advantages, returns = advantages + values).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V = 0`` after the last token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``.
    """
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    next_advantage = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Past the end (mask 0) nothing flows back: the episode is over there.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def sequence_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    ended: torch.Tensor,
    beta: float,
    missing_eos_penalty: float,
) -> torch.Tensor:
    """One reward per response for the critic-free estimators: the score, less the
    missing-EOS penalty, less ``beta`` times the response's summed per-token KL (pass
    ``beta=0`` when the KL is a loss term instead)."""
    return scores - missing_eos_penalty * (~ended).float() - beta * kl.sum(dim=1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each of a
    prompt's ``k`` responses is baselined by the mean reward of the other ``k - 1``.
    ``rewards`` holds the groups contiguously: ``[g0 r0, g0 r1, ..., g1 r0, ...]``."""
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024): ``(r - mean) / (std + eps)``
    over a prompt's ``k`` responses (unbiased std, as TRL's GRPO). Groups contiguous."""
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def group_advantages(rewards: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """The critic-free estimator named ``estimator`` (``rloo`` or ``grpo``)."""
    if estimator == "rloo":
        return rloo_advantages(rewards, k)
    if estimator == "grpo":
        return grpo_advantages(rewards, k)
    raise ValueError(f"group advantages are 'rloo' or 'grpo', got {estimator!r}")


def kl_loss(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term: per-token k3 of the policy being trained to the reference,
    each response's token mean, then the mean over responses (its gradient flows
    through ``logp``)."""
    return sequence_mean(kl_per_token(logp, logp_ref, "k3"), mask)


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    """``E[(r - 1) - log r]`` with ``r = p / p_old``: how far this update has moved."""


def clipped_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    per_sequence: bool = False,
) -> PolicyLoss:
    """PPO's clipped surrogate: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, averaged
    over tokens (or per sequence first, with ``per_sequence``)."""
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    reduce = sequence_mean if per_sequence else masked_mean
    loss = reduce(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction.detach(), approx_kl.detach())


def clipped_value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    per_sequence: bool = False,
) -> torch.Tensor:
    """``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)``."""
    clipped = values_old + torch.clamp(values - values_old, -clip_range, clip_range)
    reduce = sequence_mean if per_sequence else masked_mean
    return 0.5 * reduce(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy's next-token distribution (for logging)."""
    logp = torch.log_softmax(logits, dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)
