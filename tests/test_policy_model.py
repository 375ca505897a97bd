"""The policy adapter on the base the reward model already uses (one copy of the weights)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.config import ModelConfig, RunConfig
from common.model import build_reward_model, encode_texts, load_base
from common.policy_model import (
    POLICY_ADAPTER,
    add_policy,
    load_policy,
    shrink_towards_reference,
    token_logprobs,
)


def perturb(model, adapter: str, scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                param.normal_(0, scale)


def batch(tokenizer):
    return encode_texts(
        tokenizer, ["How do I cook pasta?", "Budget tips?"], ["Simmer it.", "Track spending."], 32
    )


def test_reference_logprobs_equal_a_separately_loaded_base(tiny_base_dir):
    base, tokenizer = load_base(str(tiny_base_dir))
    reward = build_reward_model(base, ModelConfig(), seed=1)
    policy = add_policy(reward.lm, ModelConfig(), seed=2)
    perturb(reward.lm, POLICY_ADAPTER)
    perturb(reward.lm, "reward")
    ids, mask = batch(tokenizer)

    fresh_base, _ = load_base(str(tiny_base_dir))
    with torch.no_grad():
        expected = token_logprobs(fresh_base(input_ids=ids, attention_mask=mask).logits, ids)
    torch.testing.assert_close(policy.reference_logprobs(ids, mask), expected)
    logits, values = policy(ids, mask)
    assert values.shape == ids.shape
    assert not torch.allclose(token_logprobs(logits, ids), expected)  # the policy moved


def test_fresh_policy_is_the_reference_and_leaves_the_reward_model_alone(tiny_base_dir):
    base, tokenizer = load_base(str(tiny_base_dir))
    reward = build_reward_model(base, ModelConfig(), seed=1)
    perturb(reward.lm, "reward")
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        scores_before = reward(ids, mask)
    policy = add_policy(reward.lm, ModelConfig(), seed=2)
    with torch.no_grad():
        logits, _ = policy(ids, mask)
        torch.testing.assert_close(
            token_logprobs(logits, ids), policy.reference_logprobs(ids, mask)
        )
        perturb(reward.lm, POLICY_ADAPTER)
        torch.testing.assert_close(reward(ids, mask), scores_before)


def test_policy_adapter_saves_in_peft_layout_and_generates(tiny_base_dir, tmp_path):
    base, tokenizer = load_base(str(tiny_base_dir))
    reward = build_reward_model(base, ModelConfig(), seed=1)
    policy = add_policy(reward.lm, ModelConfig(), seed=2)
    perturb(reward.lm, POLICY_ADAPTER)
    with torch.no_grad():
        policy.value_head.weight.normal_()
    adapter_dir = policy.save_pretrained(tmp_path / "ckpt")
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        expected_logits, expected_values = policy(ids, mask)

    plain = PeftModel.from_pretrained(load_base(str(tiny_base_dir))[0], str(adapter_dir))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids, attention_mask=mask).logits, expected_logits
        )
    prompt = tokenizer(["How do I cook pasta?\n"], return_tensors="pt")
    out = plain.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]  # it generated

    other = build_reward_model(load_base(str(tiny_base_dir))[0], ModelConfig(), seed=1)
    loaded = load_policy(other.lm, adapter_dir)
    with torch.no_grad():
        logits, values = loaded(ids, mask)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(values, expected_values)


def _storages(module: torch.nn.Module, keep) -> dict[int, int]:  # noqa: ANN001
    """data pointer -> bytes of the parameters whose names ``keep`` accepts."""
    return {
        p.data_ptr(): p.numel() * p.element_size()
        for name, p in module.named_parameters()
        if keep(name)
    }


def test_one_copy_of_the_base_weights_serves_every_role_in_a_client_process(tiny_base_dir):
    """What a client process holds after serving a reward round and a policy round:
    reward model, policy, value head and reference share one set of base storages."""
    from client.policy_round import cached_policy_model

    config = RunConfig.from_flower({"model.base": str(tiny_base_dir), "model.device": "cpu"})
    reward, policy, _ = cached_policy_model(config.model, config.policy_model)
    assert policy.lm is reward.lm  # the reference is this model with every adapter off

    def is_base(name: str) -> bool:
        return "lora_" not in name

    base_storages = _storages(reward.lm, is_base)
    assert _storages(policy.lm, is_base) == base_storages
    fresh, _ = load_base(str(tiny_base_dir))
    one_copy = _storages(fresh, lambda name: True)
    assert len(base_storages) == len(one_copy)
    assert sum(base_storages.values()) == sum(one_copy.values())
    # Everything else the process trains is small: two adapters and two heads.
    extra = {**_storages(reward, lambda n: not is_base(n) or n.startswith("head.")),
             **_storages(policy, lambda n: "lora_" in n or n.startswith("value_head."))}  # fmt: skip
    assert not set(extra) & set(base_storages)
    assert sum(extra.values()) < 0.5 * sum(one_copy.values())


def test_shrinking_towards_the_reference_scales_the_kl_quadratically(tiny_base_dir):
    """The trust region's ``shrink`` mode predicts KL x factor^2 for small deltas, and
    factor 0 is the reference itself."""
    base, tokenizer = load_base(str(tiny_base_dir))
    policy = add_policy(build_reward_model(base, ModelConfig(), seed=1).lm, ModelConfig(), seed=2)
    perturb(policy.lm, POLICY_ADAPTER, scale=0.02)
    moved = {k: v.clone() for k, v in policy.trainable_state().items()}
    ids, mask = batch(tokenizer)
    with policy.lm.disable_adapter(), torch.no_grad():
        reference = torch.log_softmax(policy.lm(input_ids=ids, attention_mask=mask).logits, -1)

    def kl_at(factor: float) -> float:
        policy.load_trainable_state(shrink_towards_reference(moved, factor))
        with torch.no_grad():
            logits, _ = policy(ids, mask)
        logp = torch.log_softmax(logits, -1)
        return float((logp.exp() * (logp - reference)).sum(-1)[mask.bool()].mean())

    full = kl_at(1.0)
    assert full > 1e-4
    assert kl_at(0.5) == pytest.approx(full / 4, rel=0.1)
    assert kl_at(0.0) == pytest.approx(0.0, abs=1e-6)
    shrunk = shrink_towards_reference(moved, 0.5)
    assert torch.equal(shrunk["value.weight"], moved["value.weight"])
    assert any("lora_A" in k and torch.equal(shrunk[k], moved[k]) for k in moved)
