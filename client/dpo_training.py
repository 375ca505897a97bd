"""DPO on local comparisons: the policy adapter trained directly, with DP-SGD.

``objective = "dpo"`` replaces reward model + PPO by Direct Preference Optimization
(Rafailov et al., 2023): the loss compares how much more the policy than the
reference (adapters off) likes the chosen response over the rejected one. As for the
reward model, one comparison is one privacy unit: chosen and rejected are scored in
two forward passes whose batch dimension is the comparison, so Opacus clips one
gradient per comparison.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule

from client.reward_training import DPSettings, finish_training, noise_only_step
from common.dp_randomness import DPOptimizerWithRandomness, dp_randomness
from common.losses import dpo_loss
from common.model import EncodedPairs, encode_texts_with_starts
from common.policy_model import PolicyModel, token_logprobs


@torch.no_grad()
def reference_response_logprob(
    policy: PolicyModel, ids: torch.Tensor, mask: torch.Tensor, response_start: torch.Tensor
) -> torch.Tensor:
    return _sum_response(policy.reference_logprobs(ids, mask), mask, response_start)


def _sum_response(
    logp: torch.Tensor, mask: torch.Tensor, response_start: torch.Tensor
) -> torch.Tensor:
    # logp[:, t] scores token t + 1: response tokens are t + 1 >= response_start.
    positions = torch.arange(1, mask.shape[1], device=mask.device).unsqueeze(0)
    keep = (positions >= response_start.unsqueeze(1)) & mask[:, 1:].bool()
    return (logp * keep).sum(dim=1)


@dataclass(frozen=True)
class DPOBatch:
    """Tokenized comparisons plus where each response starts (after prompt + newline)."""

    pairs: EncodedPairs
    chosen_start: torch.Tensor
    rejected_start: torch.Tensor

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, index: torch.Tensor, device: torch.device | None = None) -> DPOBatch:
        """The comparisons at ``index``, on ``device`` (where the policy runs)."""
        p = self.pairs

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[index].to(device) if device is not None else t[index]

        return DPOBatch(
            EncodedPairs(
                pick(p.chosen_ids), pick(p.chosen_mask), pick(p.rejected_ids), pick(p.rejected_mask)
            ),
            pick(self.chosen_start),
            pick(self.rejected_start),
        )


def encode_dpo_batch(
    tokenizer,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    max_length: int,  # noqa: ANN001
) -> DPOBatch:
    chosen_ids, chosen_mask, chosen_start = encode_texts_with_starts(
        tokenizer, prompts, chosen, max_length
    )
    rejected_ids, rejected_mask, rejected_start = encode_texts_with_starts(
        tokenizer, prompts, rejected, max_length
    )
    return DPOBatch(
        EncodedPairs(chosen_ids, chosen_mask, rejected_ids, rejected_mask),
        chosen_start,
        rejected_start,
    )


def dpo_batch_loss(
    model: torch.nn.Module, policy: PolicyModel, batch: DPOBatch, beta: float
) -> torch.Tensor:
    """Mean DPO loss of a batch, ``model`` being the policy or its Opacus wrapper."""
    p = batch.pairs

    def logprob(ids, mask, start):  # noqa: ANN001, ANN202
        logits, _ = model(ids, mask)
        return _sum_response(token_logprobs(logits, ids), mask, start)

    chosen = logprob(p.chosen_ids, p.chosen_mask, batch.chosen_start)
    rejected = logprob(p.rejected_ids, p.rejected_mask, batch.rejected_start)
    ref_chosen = reference_response_logprob(policy, p.chosen_ids, p.chosen_mask, batch.chosen_start)
    ref_rejected = reference_response_logprob(
        policy, p.rejected_ids, p.rejected_mask, batch.rejected_start
    )
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)


@dataclass(frozen=True)
class DPOResult:
    mean_loss: float
    comparisons: int
    """Comparisons the steps trained on (with repeats): the KL controller's ``n_steps``."""


def train_dpo(
    policy: PolicyModel,
    batch: DPOBatch,
    *,
    steps: int,
    batch_size: int,
    beta: float,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings | None,
    seed: int = 0,
) -> DPOResult:
    """``steps`` DPO steps; with DP, Poisson batches at rate ``batch_size / len(batch)``
    and per-comparison clipping + noise.

    The steps descend the DPO loss divided by ``beta``: its gradient,
    ``-sigmoid(-beta * margin) * grad(margin)``, has one scale for every beta. Beta
    (which the KL controller moves) then decides only where a comparison stops
    pushing, i.e. how far from the reference the policy settles; the learning rate
    alone sets the step. With the plain loss a smaller beta would also mean smaller
    steps, and a controller lowering beta to let the KL grow would slow it down."""
    generator = torch.Generator().manual_seed(seed)
    rate = min(1.0, batch_size / len(batch))
    params = [p for p in policy.parameters() if p.requires_grad]
    model: torch.nn.Module = policy
    step_optimizer = optimizer
    if dp is not None:
        model = GradSampleModule(policy, loss_reduction="mean")
        randomness = dp_randomness(dp.secure, policy.device, seed)
        step_optimizer = DPOptimizerWithRandomness(
            optimizer,
            randomness=randomness,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(rate * len(batch))),
        )
    losses, comparisons = [], 0
    policy.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(steps):
                if dp is not None:
                    index = randomness.poisson_mask(len(batch), rate).nonzero().squeeze(1)
                else:
                    index = torch.randperm(len(batch), generator=generator)[:batch_size]
                step_optimizer.zero_grad(set_to_none=True)
                if len(index) == 0:
                    noise_only_step(step_optimizer, params)
                    continue
                loss = dpo_batch_loss(model, policy, batch.rows(index, policy.device), beta)
                (loss / beta).backward()
                step_optimizer.step()
                losses.append(float(loss.detach()))
                comparisons += len(index)
    finally:
        finish_training(policy, model, params)
    return DPOResult(sum(losses) / max(1, len(losses)), comparisons)
