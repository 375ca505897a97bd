"""DPO on the policy adapter: per-comparison gradients, learning, and DP."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule

from client.dpo_training import (
    dpo_batch_loss,
    encode_dpo_batch,
    reference_response_logprob,
    train_dpo,
)
from client.reward_training import DPSettings
from common.config import ModelConfig
from common.model import build_reward_model, load_base
from common.policy_model import add_policy, token_logprobs

POLICY_CONFIG = ModelConfig(lora_targets="all-linear")


def toy(tokenizer, n, offset=0):
    prompts = [f"question {k}?" for k in range(offset, offset + n)]
    chosen = [f"a fine answer {k}" for k in range(offset, offset + n)]
    rejected = [f"a poor reply {k % 7}" for k in range(offset, offset + n)]
    return encode_dpo_batch(tokenizer, prompts, chosen, rejected, 32)


@pytest.fixture()
def policy_and_tokenizer(tiny_base_dir):
    base, tokenizer = load_base(str(tiny_base_dir))
    reward = build_reward_model(base, ModelConfig(), seed=0)
    policy = add_policy(reward.lm, POLICY_CONFIG, seed=1)
    for name, p in policy.named_parameters():
        p.requires_grad_(".policy." in name)
    return policy, tokenizer


def implicit_margin(policy, batch):
    """(log pi - log ref)(chosen) - (log pi - log ref)(rejected), per comparison."""
    p = batch.pairs
    with torch.no_grad():

        def lp(ids, mask, start):
            logits, _ = policy(ids, mask)
            keep = (torch.arange(1, ids.shape[1]) >= start.unsqueeze(1)) & mask[:, 1:].bool()
            return (token_logprobs(logits, ids) * keep).sum(1)

        chosen = lp(p.chosen_ids, p.chosen_mask, batch.chosen_start) - reference_response_logprob(
            policy, p.chosen_ids, p.chosen_mask, batch.chosen_start
        )
        rejected = lp(p.rejected_ids, p.rejected_mask, batch.rejected_start) - (
            reference_response_logprob(
                policy, p.rejected_ids, p.rejected_mask, batch.rejected_start
            )
        )
    return chosen - rejected  # fmt: skip


def test_response_starts_after_the_prompt(policy_and_tokenizer):
    _, tokenizer = policy_and_tokenizer
    batch = toy(tokenizer, 3)
    for ids, start in zip(batch.pairs.chosen_ids, batch.chosen_start, strict=True):
        prompt = tokenizer.decode(ids[:start])
        assert prompt.startswith("question") and prompt.endswith("?\n")


def test_one_gradient_per_comparison_equal_to_one_at_a_time(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = toy(tokenizer, 5)
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    wrapped = GradSampleModule(policy, loss_reduction="mean")
    dpo_batch_loss(wrapped, policy, batch, beta=0.1).backward()
    rows = [p.grad_sample.detach().clone() for p in params]
    wrapped._close()
    for p in params:
        p.grad = None
    assert all(r.shape[0] == len(batch) for r in rows), "one row per comparison"
    for i in range(len(batch)):
        loss = dpo_batch_loss(policy, policy, batch.rows(torch.tensor([i])), beta=0.1)
        for single, row in zip(torch.autograd.grad(loss, params), rows, strict=True):
            torch.testing.assert_close(row[i], single, rtol=1e-4, atol=1e-6)
    policy.eval()


def test_beta_sets_where_comparisons_saturate_not_the_step_size(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    train = toy(tokenizer, 16)
    fresh = {k: v.clone() for k, v in policy.trainable_state().items()}
    params = [p for p in policy.parameters() if p.requires_grad]

    def trained(beta: float, steps: int) -> dict[str, torch.Tensor]:
        policy.load_trainable_state(fresh)
        optimizer = torch.optim.SGD(params, lr=0.05)
        train_dpo(
            policy, train, steps=steps, batch_size=16, beta=beta, optimizer=optimizer, dp=None
        )
        return {k: v.clone() for k, v in policy.trainable_state().items()}

    # At the reference every margin is 0: the first step is the same for any beta.
    small, large = trained(0.2, 1), trained(5.0, 1)
    assert any(not torch.equal(small[k], fresh[k]) for k in fresh)
    for k in fresh:
        torch.testing.assert_close(small[k], large[k])
    # Later, a large beta's comparisons saturate at small margins: it stays closer.
    trained(0.2, 40)
    far = implicit_margin(policy, train).mean()
    trained(5.0, 40)
    near = implicit_margin(policy, train).mean()
    assert 0 < near < 0.5 * far, (near, far)


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=0.5, max_grad_norm=1.0)])
def test_dpo_prefers_the_chosen_responses_on_held_out_pairs(policy_and_tokenizer, dp):
    policy, tokenizer = policy_and_tokenizer
    train, heldout = toy(tokenizer, 64), toy(tokenizer, 32, offset=500)
    assert implicit_margin(policy, heldout).abs().max() < 1e-5  # fresh policy = reference
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    result = train_dpo(
        policy, train, steps=30, batch_size=16, beta=0.1, optimizer=optimizer, dp=dp, seed=0
    )
    assert result.mean_loss < math.log(2)
    assert 30 * 16 * 0.5 < result.comparisons < 30 * 16 * 1.5  # Poisson batches of ~16
    margins = implicit_margin(policy, heldout)
    assert (margins > 0).float().mean() > 0.9, margins
