"""The client's PPO loop: per-rollout gradients, DP accounting, and learning a tiny task."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from client.ppo_training import (
    PPOSettings,
    SamplingSettings,
    dp_event_per_iteration,
    generate_rollouts,
    group_grad_samples,
    ppo_update,
    repeat_prompts,
)
from client.reward_training import DPSettings
from common.config import ModelConfig
from common.model import build_reward_model, load_base
from common.policy_model import add_policy, token_logprobs
from common.ppo import clipped_policy_loss
from common.privacy import DPEvent, epsilon

POLICY_CONFIG = ModelConfig(
    lora_targets="all-linear"
)  # LoRA on attention alone barely moves outputs
PROMPTS = ["How do I cook pasta?", "Any advice on my budget?", "What about rice?", "Tips?"]


def letter_score(prompts, responses):
    """A tiny task: the reward is the share of a response's characters that are a-z."""
    return torch.tensor([sum(c.islower() for c in r) / max(len(r), 1) for r in responses])


@pytest.fixture()
def policy_and_tokenizer(tiny_base_dir):
    base, tokenizer = load_base(str(tiny_base_dir))
    reward = build_reward_model(base, ModelConfig(), seed=0)
    policy = add_policy(reward.lm, POLICY_CONFIG, seed=1)
    for name, p in policy.named_parameters():  # only the policy adapter and value head train
        p.requires_grad_(".policy." in name or name.startswith("value_head"))
    return policy, tokenizer


def test_rollouts_end_at_eos_and_start_at_the_reference(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    rollouts = generate_rollouts(
        policy, tokenizer, PROMPTS * 2, letter_score, SamplingSettings(max_new_tokens=10), seed=0
    )
    assert len(rollouts) == 8 and rollouts.response_mask.shape == rollouts.logp_old.shape
    lengths = rollouts.response_mask.sum(dim=1)
    assert ((lengths >= 1) & (lengths <= 10)).all()
    for row, ended in zip(rollouts.ids, rollouts.ended, strict=True):
        assert (tokenizer.eos_token_id in row.tolist()) == bool(ended)
    # A fresh policy adapter (LoRA B = 0) is the reference: zero KL.
    torch.testing.assert_close(rollouts.logp_old, rollouts.logp_ref)


def move_off_the_reference(policy) -> None:
    """Perturb the trainable tensors, so that LoRA's A gets gradients too (B is 0)."""
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def assert_per_unit_gradients_are_one_unit_at_a_time(policy, r, advantages, k: int) -> None:
    """Opacus's per-response gradients of the clipped surrogate, averaged over each group
    of ``k`` responses (:func:`group_grad_samples`), equal the plain gradient of each
    group's own mean loss."""
    params = [p for n, p in policy.named_parameters() if ".policy." in n]  # the loss's

    def loss_of(model, rows):
        logits, _ = model(r.ids[rows], r.mask[rows], r.positions[rows])
        return clipped_policy_loss(
            token_logprobs(logits, r.ids[rows]), r.logp_old[rows], advantages[rows],
            r.response_mask[rows], 0.2, per_sequence=True,
        ).loss  # fmt: skip

    policy.train()
    wrapped = GradSampleModule(policy, loss_reduction="mean")
    loss_of(wrapped, torch.arange(len(r))).backward()
    group_grad_samples(params, k)
    per_unit = [p.grad_sample.detach().clone() for p in params]
    wrapped._close()
    for p in params:
        p.grad = None
    units = len(r) // k
    assert all(g.shape[0] == units for g in per_unit)
    for u in range(units):
        grads = torch.autograd.grad(loss_of(policy, torch.arange(u * k, (u + 1) * k)), params)
        for single, rows in zip(grads, per_unit, strict=True):
            torch.testing.assert_close(rows[u], single, rtol=1e-4, atol=1e-6)
    policy.eval()


def test_one_gradient_per_rollout_equal_to_one_at_a_time(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    move_off_the_reference(policy)
    r = generate_rollouts(
        policy, tokenizer, PROMPTS, letter_score, SamplingSettings(max_new_tokens=6), seed=1
    )
    assert_per_unit_gradients_are_one_unit_at_a_time(policy, r, torch.randn_like(r.logp_old), k=1)


def test_one_gradient_per_prompt_group_equal_to_one_group_at_a_time(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    move_off_the_reference(policy)
    k = 3
    r = generate_rollouts(
        policy, tokenizer, repeat_prompts(PROMPTS, k), letter_score,
        SamplingSettings(max_new_tokens=6), seed=2,
    )  # fmt: skip
    advantages = torch.randn(len(r)).unsqueeze(1) * r.response_mask
    assert_per_unit_gradients_are_one_unit_at_a_time(policy, r, advantages, k)


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_dp_step_without_noise_or_clipping_is_the_plain_group_step(policy_and_tokenizer, advantage):
    """Through the real ppo_update: with the noise at 0 and a clip no gradient reaches,
    the DP step (clipped per prompt group, summed, divided by the groups) is the plain
    step, so the groups are formed and weighed right."""
    policy, tokenizer = policy_and_tokenizer
    policy.value_head.requires_grad_(False)  # critic-free: the policy round freezes it
    move_off_the_reference(policy)
    k = 2
    settings = PPOSettings(
        ppo_epochs=1, advantage=advantage, samples_per_prompt=k, kl_penalty="loss"
    )
    rollouts = generate_rollouts(
        policy, tokenizer, repeat_prompts(PROMPTS, k), letter_score,
        SamplingSettings(max_new_tokens=6), seed=3,
    )  # fmt: skip
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    after = []
    for dp in (None, DPSettings(noise_multiplier=0.0, max_grad_norm=1e6)):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        optimizer = torch.optim.SGD(list(params.values()), lr=0.5)
        ppo_update(
            policy, rollouts, 0.1, settings, optimizer, dp=dp,
            expected_batch_size=len(PROMPTS), seed=0,
        )  # fmt: skip
        after.append({n: p.detach().clone() for n, p in params.items()})
    for n in params:
        torch.testing.assert_close(after[1][n], after[0][n], rtol=1e-4, atol=1e-7)
        assert not torch.equal(after[0][n], start[n]), n


def test_ppo_epochs_on_one_sample_compose_into_one_gaussian():
    # Without subsampling the Gaussian's RDP is exact: k steps at sigma = one at sigma/sqrt(k).
    dp = DPSettings(noise_multiplier=2.0, max_grad_norm=1.0)
    event = dp_event_per_iteration(dp, sample_rate=1.0, ppo_epochs=4)
    assert event == DPEvent(1.0, 1.0, 1)
    assert epsilon([event], 1e-5) == pytest.approx(epsilon([DPEvent(2.0, 1.0, 4)], 1e-5))


def test_a_short_ppo_run_raises_the_reward(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    sampling = SamplingSettings(max_new_tokens=8)
    settings = PPOSettings(ppo_epochs=4, minibatches=2, target_approx_kl=1.0)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    prompts = PROMPTS * 8

    def mean_score(seed):
        rollouts = generate_rollouts(policy, tokenizer, prompts, letter_score, sampling, seed)
        return float(rollouts.scores.mean()), rollouts

    before, _ = mean_score(1000)
    for iteration in range(25):
        _, rollouts = mean_score(iteration)
        stats = ppo_update(
            policy, rollouts, beta=0.01, settings=settings, optimizer=optimizer,
            seed=iteration,
        )  # fmt: skip
        assert stats.steps >= 1
    after = sum(mean_score(2000 + k)[0] for k in range(3)) / 3
    assert after > before + 0.15, (before, after)


def test_a_short_rloo_run_raises_the_reward(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    sampling = SamplingSettings(max_new_tokens=8)
    settings = PPOSettings(ppo_epochs=2, advantage="rloo", samples_per_prompt=4)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)

    def mean_score(prompts, seed):
        rollouts = generate_rollouts(policy, tokenizer, prompts, letter_score, sampling, seed)
        return float(rollouts.scores.mean()), rollouts

    before = mean_score(PROMPTS * 8, 1000)[0]
    for iteration in range(15):
        _, rollouts = mean_score(repeat_prompts(PROMPTS * 2, 4), iteration)
        ppo_update(
            policy, rollouts, beta=0.01, settings=settings, optimizer=optimizer, seed=iteration
        )
    after = sum(mean_score(PROMPTS * 8, 2000 + k)[0] for k in range(3)) / 3
    assert after > before + 0.15, (before, after)


def test_dp_ppo_moves_every_policy_tensor_and_handles_an_empty_sample(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    rollouts = generate_rollouts(
        policy, tokenizer, PROMPTS * 2, letter_score, SamplingSettings(max_new_tokens=6), seed=0
    )
    stats = ppo_update(
        policy, rollouts, 0.05, PPOSettings(ppo_epochs=2, minibatches=2), optimizer,
        dp=dp, expected_batch_size=8, seed=0,
    )  # fmt: skip
    assert stats.steps == 4 and not stats.early_stopped
    for name, p in params.items():
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
    # A Poisson sample with no prompt in it still takes its noise steps.
    empty = generate_rollouts(
        policy, tokenizer, [], letter_score, SamplingSettings(max_new_tokens=6), seed=0
    )
    assert len(empty) == 0
    moved = {n: p.detach().clone() for n, p in params.items()}
    stats = ppo_update(
        policy, empty, 0.05, PPOSettings(ppo_epochs=2, minibatches=1), optimizer,
        dp=dp, expected_batch_size=8, seed=1,
    )  # fmt: skip
    assert stats.steps == 2
    assert all(not torch.equal(p, moved[n]) for n, p in params.items())  # pure noise
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params.values())
