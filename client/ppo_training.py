"""One client's PPO: rollouts on local prompts, then clipped updates, optionally with DP.

An iteration, every step named (the math is in :mod:`common.ppo`):

1. **Rollouts.** Sample responses from the policy for a batch of local prompts
   (temperature, top-p, max new tokens; a response ends at the first EOS), score
   each with the reward function, and record the policy's log-probabilities and
   values and the reference's log-probabilities (adapters off), all without grad.
2. **Rewards and advantages.** ``advantage="gae"``: per-token KL penalty
   ``-beta * kl`` plus the score on the last token (minus a penalty if the response
   never ended), GAE on the value head, whitening. ``"rloo"`` / ``"grpo"``: each
   prompt has ``samples_per_prompt`` responses, one reward per response (score, EOS
   penalty, ``-beta`` x its summed KL), baselined by the prompt's other responses;
   no value head. With ``kl_penalty="loss"`` the KL leaves the reward and enters the
   loss as GRPO's per-token k3 term instead.
3. **Updates.** ``ppo_epochs`` passes over random minibatches of prompts: clipped
   surrogate (+ ``value_coef`` * clipped value loss for GAE, + ``beta`` * KL term).
   Without DP, stop early once the approximate KL between the new and the rollout
   policy passes ``target_approx_kl``.

With DP, one prompt with all its responses is the privacy unit: the loss is a mean
over responses of each response's own token mean, Opacus computes one gradient per
response, and :func:`group_grad_samples` averages those of a prompt's responses into
one before it is clipped and noised. Each prompt enters ``ppo_epochs`` noisy steps per
iteration, which compose into one Gaussian mechanism with noise multiplier
``sigma / sqrt(ppo_epochs)`` on a Poisson sample of the prompts (see
:func:`dp_event_per_iteration`). Early stop would read private data, so it is off
under DP.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule

from client.reward_training import DPSettings, finish_training, noise_only_step
from common.chat_format import prompt_token_ids
from common.config import PolicyConfig
from common.dp_randomness import DPOptimizerWithRandomness, dp_randomness
from common.policy_model import PolicyModel, token_logprobs
from common.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    gae,
    group_advantages,
    kl_loss,
    kl_per_token,
    masked_mean,
    masked_whiten,
    sequence_rewards,
    shaped_rewards,
)
from common.privacy import DPEvent

ScoreFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]
"""(prompts, responses) -> one reward-model score per response."""


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def of(cls, config: PolicyConfig) -> SamplingSettings:
        return cls(config.max_new_tokens, config.temperature, config.top_p)


@dataclass(frozen=True)
class PPOSettings:
    kl_estimator: str = "k3"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.1
    ppo_epochs: int = 4
    minibatches: int = 1
    target_approx_kl: float = 0.1
    missing_eos_penalty: float = 1.0
    whiten_advantages: bool = True
    advantage: str = "gae"
    samples_per_prompt: int = 1
    kl_penalty: str = "reward"

    @classmethod
    def of(cls, config: PolicyConfig) -> PPOSettings:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"


def repeat_prompts(prompts: Sequence[str], k: int) -> list[str]:
    """Each prompt ``k`` times in a row: the layout of a batch of response groups."""
    return [p for p in prompts for _ in range(k)]


def group_rows(groups: torch.Tensor, k: int) -> torch.Tensor:
    """The rows of the response groups ``groups`` (groups are ``k`` contiguous rows)."""
    return (groups.unsqueeze(1) * k + torch.arange(k)).reshape(-1)


def group_grad_samples(params: Sequence[torch.nn.Parameter], k: int) -> None:
    """Replace Opacus's per-response gradients by per-prompt ones: the mean over each
    group of ``k`` contiguous rows, the gradient of the group's mean loss (Opacus's
    per-sample gradient of a mean-reduced loss is that sample's own loss gradient)."""
    if k == 1:
        return
    for p in params:
        gs = p.grad_sample
        p.grad_sample = gs.view(-1, k, *gs.shape[1:]).mean(dim=1)


def advantages_of(
    rollouts: Rollouts, kl: torch.Tensor, beta: float, settings: PPOSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 2: per-token advantages, and the value targets (``None`` if critic-free)."""
    r = rollouts
    reward_beta = beta if settings.kl_penalty == "reward" else 0.0
    if settings.critic_free:
        rewards = sequence_rewards(r.scores, kl, r.ended, reward_beta, settings.missing_eos_penalty)
        per_response = group_advantages(rewards, settings.samples_per_prompt, settings.advantage)
        return per_response.unsqueeze(1) * r.response_mask, None
    rewards = shaped_rewards(
        r.scores, kl, r.response_mask, r.ended, reward_beta, settings.missing_eos_penalty
    )
    advantages, returns = gae(rewards, r.values_old, r.response_mask, settings.gamma, settings.lam)
    if settings.whiten_advantages and len(r) > 1:
        advantages = masked_whiten(advantages, r.response_mask)
    return advantages, returns


@dataclass
class Rollouts:
    prompts: list[str]
    responses: list[str]
    ids: torch.Tensor
    """``[B, T]``: left-padded prompt, then the response (right-padded)."""
    mask: torch.Tensor
    positions: torch.Tensor
    response_mask: torch.Tensor
    """``[B, T - 1]``: 1 where the next token belongs to the response (EOS included)."""
    ended: torch.Tensor
    scores: torch.Tensor
    logp_old: torch.Tensor
    logp_ref: torch.Tensor
    values_old: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: torch.Tensor) -> Rollouts:
        pick = [int(i) for i in rows]
        return Rollouts(
            [self.prompts[i] for i in pick],
            [self.responses[i] for i in pick],
            *(t[rows] for t in (self.ids, self.mask, self.positions, self.response_mask)),
            *(t[rows] for t in (self.ended, self.scores, self.logp_old, self.logp_ref)),
            self.values_old[rows],
        )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def left_padded_prompts(
    tokenizer,
    prompts: Sequence[str],
    device: torch.device,  # noqa: ANN001
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts in the training format (:mod:`common.chat_format`), left-padded so that
    every row's response starts at the same column."""
    rows = prompt_token_ids(tokenizer, list(prompts))
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _no_rollouts(device: torch.device) -> Rollouts:
    def empty(*shape: int, dtype: torch.dtype = torch.float) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    ids = empty(0, 2, dtype=torch.long)  # one prompt and one response column, no rows
    return Rollouts(
        [], [], ids, ids.clone(), ids.clone(), empty(0, 1), empty(0, dtype=torch.bool),
        empty(0), empty(0, 1), empty(0, 1), empty(0, 1),
    )  # fmt: skip


@torch.no_grad()
def generate_rollouts(
    policy: PolicyModel,
    tokenizer,  # noqa: ANN001
    prompts: Sequence[str],
    score_fn: ScoreFn,
    sampling: SamplingSettings,
    seed: int,
    reference: bool = False,
) -> Rollouts:
    """Step 1: sample, cut at EOS, score, and record old/reference log-probs and values.

    ``reference`` samples from the reference (adapters off) instead, for evaluation.
    No prompts (an empty Poisson sample) give no rollouts.
    """
    if not prompts:
        return _no_rollouts(policy.device)
    input_ids, attention_mask = left_padded_prompts(tokenizer, prompts, policy.device)
    torch.manual_seed(seed)
    out = policy.generate(
        input_ids,
        attention_mask,
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        reference=reference,
    )
    prompt_width = input_ids.shape[1]
    generated = out[:, prompt_width:]
    is_eos = generated == tokenizer.eos_token_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), generated.shape[1] - 1)
    steps = torch.arange(generated.shape[1], device=generated.device).unsqueeze(0)
    response_tokens = (steps <= first_eos.unsqueeze(1)).long()
    generated = torch.where(response_tokens.bool(), generated, tokenizer.pad_token_id)

    ids = torch.cat([input_ids, generated], dim=1)
    mask = torch.cat([attention_mask, response_tokens], dim=1)
    positions = _positions(mask)
    response_mask = torch.cat(
        [response_tokens.new_zeros(len(prompts), prompt_width - 1), response_tokens], dim=1
    ).float()
    responses = [
        tokenizer.decode(row[: int(n)], skip_special_tokens=True).strip()
        for row, n in zip(generated, first_eos + (~ended).long(), strict=True)
    ]
    logits, values = policy(ids, mask, positions)
    return Rollouts(
        prompts=list(prompts),
        responses=responses,
        ids=ids,
        mask=mask,
        positions=positions,
        response_mask=response_mask,
        ended=ended,
        scores=score_fn(list(prompts), responses).float().to(ids.device),
        logp_old=token_logprobs(logits, ids),
        logp_ref=policy.reference_logprobs(ids, mask, positions),
        values_old=values[:, :-1],
    )


@dataclass(frozen=True)
class PPOStats:
    score: float
    kl: float
    """Mean over rollouts of the summed per-token KL to the reference."""
    entropy: float
    policy_loss: float
    value_loss: float
    clip_fraction: float
    approx_kl: float
    steps: int
    early_stopped: bool
    rollouts: int


def dp_event_per_iteration(dp: DPSettings, sample_rate: float, ppo_epochs: int) -> DPEvent:
    """The privacy cost of one iteration (one Poisson sample of prompts, ``ppo_epochs``
    noisy steps on it): ``ppo_epochs`` Gaussian mechanisms on the same rollout compose
    to one with noise multiplier ``sigma / sqrt(ppo_epochs)``."""
    return DPEvent(dp.noise_multiplier / math.sqrt(ppo_epochs), sample_rate, 1)


def ppo_update(
    policy: PolicyModel,
    rollouts: Rollouts,
    beta: float,
    settings: PPOSettings,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings | None = None,
    expected_batch_size: float | None = None,
    seed: int = 0,
) -> PPOStats:
    """Steps 2 and 3 on one batch of rollouts (possibly empty under DP), whose
    response groups (``samples_per_prompt`` rows each) are contiguous."""
    r = rollouts
    k = settings.samples_per_prompt
    if len(r) % k:
        raise ValueError(f"{len(r)} rollouts are not groups of {k} responses per prompt")
    kl = kl_per_token(r.logp_old, r.logp_ref, settings.kl_estimator) * r.response_mask
    advantages, returns = advantages_of(r, kl, beta, settings)

    params = [p for p in policy.parameters() if p.requires_grad]
    model: torch.nn.Module = policy
    step_optimizer = optimizer
    if dp is not None:
        if expected_batch_size is None:
            raise ValueError("DP PPO needs the expected batch size of its Poisson sample")
        model = GradSampleModule(policy, loss_reduction="mean")
        step_optimizer = DPOptimizerWithRandomness(
            optimizer,
            randomness=dp_randomness(dp.secure, policy.device, seed),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(expected_batch_size / settings.minibatches)),
        )
    generator = torch.Generator().manual_seed(seed + 2)  # dp_randomness uses seed, seed + 1
    losses: dict[str, list[float]] = {k: [] for k in ("policy", "value", "clip", "akl", "ent")}
    steps, early_stopped = 0, False
    policy.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(settings.ppo_epochs):
                order = torch.randperm(len(r) // k, generator=generator)
                for groups in order.tensor_split(settings.minibatches):
                    step_optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    if len(groups) == 0:  # an empty Poisson sample still takes a noise step
                        noise_only_step(step_optimizer, params)
                        continue
                    rows = group_rows(groups, k)
                    mb = r.select(rows)
                    logits, values = model(mb.ids, mb.mask, mb.positions)
                    logp = token_logprobs(logits, mb.ids)
                    pl = clipped_policy_loss(
                        logp, mb.logp_old, advantages[rows], mb.response_mask,
                        settings.clip_range, per_sequence=True,
                    )  # fmt: skip
                    loss = pl.loss
                    vl = torch.zeros(())
                    if returns is not None:
                        vl = clipped_value_loss(
                            values[:, :-1], mb.values_old, returns[rows], mb.response_mask,
                            settings.value_clip_range, per_sequence=True,
                        )  # fmt: skip
                        loss = loss + settings.value_coef * vl
                    if settings.kl_penalty == "loss":
                        loss = loss + beta * kl_loss(logp, mb.logp_ref, mb.response_mask)
                    loss.backward()
                    if dp is not None:
                        group_grad_samples(params, k)
                    step_optimizer.step()
                    with torch.no_grad():
                        ent = entropy(logits[:, :-1], mb.response_mask)
                    for key, value in zip(
                        losses, (pl.loss, vl, pl.clip_fraction, pl.approx_kl, ent), strict=True
                    ):
                        losses[key].append(float(value.detach()))
                if dp is None and losses["akl"] and losses["akl"][-1] > settings.target_approx_kl:
                    early_stopped = True
                    break
    finally:
        finish_training(policy, model, params)

    def mean(key: str) -> float:
        return sum(losses[key]) / len(losses[key]) if losses[key] else 0.0

    return PPOStats(
        score=float(r.scores.mean()) if len(r) else 0.0,
        kl=float(kl.sum(dim=1).mean()) if len(r) else 0.0,
        entropy=mean("ent"),
        policy_loss=mean("policy"),
        value_loss=mean("value"),
        clip_fraction=mean("clip"),
        approx_kl=mean("akl"),
        steps=steps,
        early_stopped=early_stopped,
        rollouts=len(r),
    )


def mean_kl_to_reference(rollouts: Rollouts, estimator: str = "k3") -> float:
    """Mean per-token KL of the rollouts' policy to the reference (for reports)."""
    kl = kl_per_token(rollouts.logp_old, rollouts.logp_ref, estimator)
    return float(masked_mean(kl, rollouts.response_mask))
