"""PPO, KL and DPO math against values computed by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses import dpo_loss
from common.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    gae,
    grpo_advantages,
    kl_loss,
    kl_per_token,
    masked_whiten,
    rloo_advantages,
    sequence_rewards,
    shaped_rewards,
)
from server.kl_controller import AdaptiveKLController, FixedKLController

T = torch.tensor


def test_kl_estimators():
    logp, logp_ref = T([[-1.0]]), T([[-1.5]])
    assert kl_per_token(logp, logp_ref, "k1").item() == pytest.approx(0.5)
    # k3 = (r - 1) - log r, r = exp(-1.5 - (-1)) = e^-0.5 = 0.606531
    assert kl_per_token(logp, logp_ref, "k3").item() == pytest.approx(0.606531 - 1 + 0.5, abs=1e-6)
    assert kl_per_token(logp_ref, logp, "k3").item() > 0  # never negative
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, logp_ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_token_and_penalize_no_eos():
    kl, mask = T([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]), T([[1.0, 1, 0], [1, 1, 1]])
    rewards = shaped_rewards(T([2.0, 2.0]), kl, mask, T([False, True]), 0.5, 1.0)
    # row 0: -0.5*0.1, -0.5*0.2 + (2 - 1 penalty), padding 0
    # row 1: -0.05, -0.1, -0.15 + 2 (it ended: no penalty)
    torch.testing.assert_close(rewards, T([[-0.05, 0.9, 0.0], [-0.05, -0.1, 1.85]]))
    # A response after the prompt (mask starts later): the score still lands on its end.
    late = shaped_rewards(
        T([2.0]), T([[0.0, 0.2, 0.4, 0.0]]), T([[0.0, 1, 1, 0]]), T([True]), 1.0, 0.0
    )
    torch.testing.assert_close(late, T([[0.0, -0.2, 1.6, 0.0]]))


def test_gae_by_hand_with_padding():
    rewards = T([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
    values = T([[0.5, 1.0, 1.5], [1.0, 2.0, 7.0]])
    mask = T([[1.0, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 - 1.5 = 0.5; d1 = 0.9*1.5 - 1 = 0.35, A1 = 0.35 + 0.72*0.5 = 0.71;
    #        d0 = 1 + 0.9*1 - 0.5 = 1.4, A0 = 1.4 + 0.72*0.71 = 1.9112
    # row 1: the last token is t=1: d1 = 1 - 2 = -1; A0 = 0.5 + 0.9*2 - 1 + 0.72*(-1) = 0.58
    torch.testing.assert_close(advantages, T([[1.9112, 0.71, 0.5], [0.58, -1.0, 0.0]]))
    torch.testing.assert_close(returns, T([[2.4112, 1.71, 2.0], [1.58, 1.0, 0.0]]))


def test_sequence_rewards_subtract_the_eos_penalty_and_the_summed_kl():
    kl = T([[0.1, 0.2, 0.0], [0.5, 0.0, 0.0]])
    rewards = sequence_rewards(T([1.0, 2.0]), kl, T([True, False]), beta=0.5, missing_eos_penalty=1)
    # 1 - 0.5 * 0.3 = 0.85; 2 - 1 - 0.5 * 0.5 = 0.75
    torch.testing.assert_close(rewards, T([0.85, 0.75]))


def test_rloo_baselines_each_response_by_the_others_of_its_prompt():
    # Prompt 1: rewards 1, 2, 6 -> 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5.
    # Prompt 2: rewards 0, 0, 3 -> 0 - 1.5, 0 - 1.5, 3 - 0.
    advantages = rloo_advantages(T([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    torch.testing.assert_close(advantages, T([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(T([1.0]), k=1)


def test_grpo_normalizes_by_the_group_mean_and_std():
    # Prompt 1: 1, 2, 6: mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.645751.
    # Prompt 2: 5, 5: std 0, so both advantages are 0 (eps keeps it finite).
    advantages = grpo_advantages(T([1.0, 2.0, 6.0]), k=3)
    s = math.sqrt(7) + 1e-4
    torch.testing.assert_close(advantages, T([-2 / s, -1 / s, 3 / s]))
    torch.testing.assert_close(grpo_advantages(T([5.0, 5.0]), k=2), T([0.0, 0.0]))


def test_kl_loss_is_the_mean_per_response_token_k3_and_pulls_towards_the_reference():
    logp = T([[-1.0, -2.0], [-1.0, 0.0]], requires_grad=True)
    logp_ref = T([[-1.5, -2.0], [-1.0, 0.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    # Response 1: k3 = e^-0.5 - 1 + 0.5 = 0.106531 and 0 -> mean 0.053265; response 2: 0.
    loss = kl_loss(logp, logp_ref, mask)
    assert loss.item() == pytest.approx(0.106531 / 4, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(logp_ref - logp) = 1 - e^-0.5 > 0: lowering logp lowers it.
    assert logp.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 4, abs=1e-6)
    assert logp.grad[1, 1].item() == 0.0


def test_whitening_ignores_padding():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1, 1, 0]])
    # mean 2, variance 2/3 -> (x - 2) / 0.816497
    torch.testing.assert_close(masked_whiten(x, mask), T([[-1.224745, 0.0, 1.224745, 0.0]]))
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, T([[0.775255, 2.0, 3.224745, 0.0]]))


def test_clipped_policy_loss_by_hand():
    logp_old = T([[0.0, 0.0]])
    logp = torch.log(T([[1.5, 1.5]]))  # ratio 1.5 on both tokens
    out = clipped_policy_loss(logp, logp_old, T([[1.0, -1.0]]), T([[1.0, 1.0]]), 0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 -> mean 0.15
    assert out.loss.item() == pytest.approx(0.15)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(0.5 - math.log(1.5))


def test_clipped_value_loss_by_hand():
    # V=2, V_old=1, R=1.5, eps 0.2: clipped V = 1.2; max(0.25, 0.09) / 2 = 0.125
    loss = clipped_value_loss(T([[2.0]]), T([[1.0]]), T([[1.5]]), T([[1.0]]), 0.2)
    assert loss.item() == pytest.approx(0.125)
    # V=0.9, V_old=1, R=2, eps 0.05: clipped V = 0.95; max(1.1^2, 1.05^2) / 2 = 0.605
    loss = clipped_value_loss(T([[0.9]]), T([[1.0]]), T([[2.0]]), T([[1.0]]), 0.05)
    assert loss.item() == pytest.approx(0.605)


def test_entropy_of_a_uniform_distribution():
    logits = torch.zeros(1, 2, 4)
    assert entropy(logits, T([[1.0, 0.0]])).item() == pytest.approx(math.log(4))


def test_dpo_loss_by_hand():
    # beta * ((-1 + 1.5) - (-2 + 1.8)) = 0.1 * 0.7 = 0.07; -log sigmoid(0.07) = 0.658759
    loss = dpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.8]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.07)))
    assert loss.item() == pytest.approx(0.658759, abs=1e-6)


def test_adaptive_kl_controller_update_rule():
    # error = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + error * n / horizon
    for kl, expected in ((9.0, 0.1 * (1 + 0.2 * 0.0256)), (3.0, 0.1 * (1 - 0.2 * 0.0256)),
                         (6.6, 0.1 * (1 + 0.1 * 0.0256)), (6.0, 0.1)):  # fmt: skip
        controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
        assert controller.update(kl, n_steps=256) == pytest.approx(expected)
    assert FixedKLController(0.05).update(100.0, 256) == 0.05


def test_adaptive_kl_controller_never_flips_beta_sign_on_a_large_round():
    controller = AdaptiveKLController(beta=0.1, target=0.5, horizon=50)
    controller.update(observed_kl=0.0, n_steps=5000)  # 100 horizons in one round
    assert controller.beta == pytest.approx(0.1 * (1 - 0.2))


def test_trust_region_takes_scales_or_rejects_the_step():
    from server.kl_controller import trust_region

    assert trust_region(1.0, 3.0, 4.0, "scale").scale == 1.0
    # The line from KL 2 (s=0) to KL 10 (s=1) meets the bound 4 at s = 2/8.
    scaled = trust_region(2.0, 10.0, 4.0, "scale")
    assert scaled.scale == pytest.approx(0.25) and "scaled by 0.250" in scaled.reason
    rejected = trust_region(2.0, 10.0, 4.0, "reject")
    assert rejected.scale == 0.0 and rejected.reason.startswith("rejected")
    assert trust_region(5.0, 6.0, 4.0, "scale").scale == 0.0  # already outside: no step out
    assert trust_region(6.0, 5.0, 4.0, "reject").scale == 1.0  # but a step back is taken
    with pytest.raises(ValueError, match="scale"):
        trust_region(1.0, 2.0, 4.0, "clip")


def test_trust_region_shrink_takes_the_step_and_pulls_back_to_the_bound():
    from server.kl_controller import trust_region

    within = trust_region(0.5, 0.7, 0.75, "shrink")
    assert (within.scale, within.shrink) == (1.0, 1.0)
    assert within.predicted_kl(0.5, 0.7) == pytest.approx(0.7)
    # At the bound already, where "scale" rejects every step, "shrink" still moves.
    assert trust_region(0.75, 3.0, 0.75, "scale").scale == 0.0
    shrunk = trust_region(0.75, 3.0, 0.75, "shrink")
    assert shrunk.scale == 1.0 and shrunk.shrink == pytest.approx(0.5)
    assert shrunk.predicted_kl(0.75, 3.0) == pytest.approx(0.75)
    assert "shrunk by 0.500" in shrunk.reason
