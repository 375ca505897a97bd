"""Real architectures (Llama 3, Qwen2, GPT-2 conventions) in float32 and bfloat16, on CPU.

Each is a small random checkpoint with its family's tokenizer and chat template, saved
and loaded with ``from_pretrained``; the rounds go through the real ClientApp and
phase driver. Per-sample gradients in bfloat16 are checked against one-at-a-time ones.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel

from client.reward_training import _pair_loss
from client.store import PreferenceStore
from common.chat_format import prompt_token_ids
from common.config import ModelConfig, RunConfig
from common.losses import bradley_terry_loss
from common.model import (
    build_reward_model,
    encode_pairs,
    load_base,
    load_reward_model,
    score_pairs,
    train_only,
)
from server.checkpoints import RunDirectory
from server.phase_driver import PhaseDriver
from simulations.architectures import ARCHITECTURES, build_checkpoint
from tests.inprocess_grid import InProcessGrid
from tests.test_secure_rounds import make_stores, run_config

ROUNDS = {
    # A reward round then a PPO round (the PPO client scores with the new reward model),
    # and a DPO round on its own.
    "ppo": {"reward.rounds": 1, "policy.rounds": 1, "policy.objective": "ppo"},
    "dpo": {"reward.rounds": 0, "policy.rounds": 1, "policy.objective": "dpo"},
}
SMALL_ROUNDS = {
    "policy.iterations": 2,
    "policy.batch-size": 8,
    "policy.measure-prompts": 8,
    "policy.max-new-tokens": 8,
    "federation.secure-aggregation": False,
    # DP on, with little noise, so that one round on 40-60 comparisons learns visibly.
    "privacy.epsilon": 200.0,
    "model.device": "cpu",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {name: build_checkpoint(name, root / name) for name in ARCHITECTURES}


def heldout_pairs(tokenizer, max_length: int = 96):
    prompts = [f"question 9-{k}?" for k in range(24)]
    return encode_pairs(
        tokenizer,
        prompts,
        [f"a fine answer {k}" for k in range(100, 124)],
        [f"a poor reply {k % 7}" for k in range(24)],
        max_length,
    )


def run_rounds(base_dir, tmp_path, name: str, dtype: str):
    stores = make_stores(tmp_path / f"{name}-{dtype}" / "stores")
    flat = run_config(
        base_dir,
        tmp_path / f"{name}-{dtype}" / "run",
        **{**SMALL_ROUNDS, **ROUNDS[name], "model.dtype": dtype},
    )
    grid = InProcessGrid(stores, flat)
    driver = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    state = driver.run_all()
    ledgers = {}
    for node, node_config in stores.items():
        with PreferenceStore(node_config["store"]) as store:
            ledgers[node] = [(e.phase, e.round, e.event, e.status) for e in store.ledger()]
    return RunDirectory(driver.config.run_dir), state, ledgers


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_reward_ppo_and_dpo_rounds_in_float32_and_bfloat16(checkpoints, tmp_path, architecture):
    base_dir = checkpoints[architecture]
    ledgers = {}
    for dtype in ("float32", "bfloat16"):
        for name in ROUNDS:
            run, state, ledgers[name, dtype] = run_rounds(base_dir, tmp_path, name, dtype)
            trained = [h for h in state.history if h["task"] == "train"]
            assert trained and all(h["survivors"] == 3 for h in trained), state.history
            final = run.checkpoints / "policy-round-0001"
            start = run.load(run.checkpoints / "policy-round-0000").policy
            moved = run.load(final).policy
            assert any(not torch.equal(start[n], moved[n]) for n in start), (name, dtype)

            # The policy adapter loads with PEFT alone and generates in the chat format.
            base, tokenizer = load_base(str(base_dir))
            policy = PeftModel.from_pretrained(base, str(final / "policy"))
            ids = torch.tensor(prompt_token_ids(tokenizer, ["question 0-1?"]))
            out = policy.generate(
                input_ids=ids,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            assert out.shape[1] > ids.shape[1]
            if name != "ppo":
                continue
            # The reward adapter loads with PEFT and scores unseen pairs better than the
            # untrained one the run started from.
            losses = {}
            for label, checkpoint in (("untrained", "reward-round-0000"), ("trained", "reward-round-0001")):  # fmt: skip
                fresh, tokenizer = load_base(str(base_dir))
                model = load_reward_model(fresh, run.checkpoints / checkpoint / "reward")
                assert isinstance(model.lm, PeftModel)
                margins = score_pairs(model, heldout_pairs(tokenizer))
                losses[label] = float(bradley_terry_loss(margins, torch.zeros_like(margins)))
            assert losses["trained"] < losses["untrained"] - 0.01, (dtype, losses)

    # The ledger does not depend on the compute dtype: same mechanisms, same epsilon.
    for name in ROUNDS:
        assert ledgers[name, "float32"] == ledgers[name, "bfloat16"]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_bfloat16_base_keeps_adapters_heads_and_per_sample_gradients_float32(
    checkpoints, architecture
):
    """On a bfloat16 base, Opacus's per-comparison gradients are float32; their mean is
    the batch gradient (relative error < 1e-4), and each equals the one-at-a-time
    gradient within 10% of its norm (relative error of the flattened gradient). The
    one-at-a-time gradient in bfloat16 is itself 1-5% from float32's on these models:
    the batch and the single pass run the bfloat16 kernels on other shapes."""
    config = ModelConfig(device="cpu", dtype="bfloat16")
    base, tokenizer = load_base(str(checkpoints[architecture]), config=config)
    assert base.dtype == torch.bfloat16
    model = build_reward_model(base, config)
    train_only(model, "reward", ("head.",))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)

    pairs = heldout_pairs(tokenizer)
    n = 6
    batch = tuple(
        t[:n]
        for t in (pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask)
    )
    model.train()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    _pair_loss(wrapped, batch).backward()
    per_sample = [p.grad_sample.clone() for p in params]
    batch_grad = torch.cat([p.grad.flatten() for p in params])
    wrapped._close()
    assert all(g.dtype == torch.float32 for g in per_sample)
    mean = torch.cat([g.mean(dim=0).flatten() for g in per_sample])
    assert (mean - batch_grad).norm() / batch_grad.norm() < 1e-4

    for i in range(n):
        single = tuple(t[i : i + 1] for t in batch)
        alone = torch.cat(
            [g.flatten() for g in torch.autograd.grad(_pair_loss(model, single), params)]
        )
        in_batch = torch.cat([g[i].flatten() for g in per_sample])
        error = (in_batch - alone).norm() / alone.norm()
        assert error < 0.1, (architecture, i, float(error))


def test_named_lora_targets_missing_from_the_model_are_named(checkpoints):
    base, _ = load_base(str(checkpoints["gpt2"]))
    with pytest.raises(ValueError, match=r"q_proj.*does not have.*c_attn"):
        build_reward_model(base, ModelConfig(lora_targets="q_proj,v_proj"))


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(checkpoints, architecture):
    grads = {}
    for checkpointing in (False, True):
        config = ModelConfig(device="cpu", dtype="float32", gradient_checkpointing=checkpointing)
        base, tokenizer = load_base(str(checkpoints[architecture]), config=config)
        on = getattr(base, "is_activation_checkpointing", None)  # Transformers >= 5.x
        assert (base.is_gradient_checkpointing if on is None else on) == checkpointing
        model = build_reward_model(base, config, seed=0)
        train_only(model, "reward", ("head.",))
        params = [p for p in model.parameters() if p.requires_grad]
        pairs = heldout_pairs(tokenizer)
        batch = (pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask)
        model.train()
        grads[checkpointing] = torch.autograd.grad(_pair_loss(model, batch), params)
    for plain, recomputed in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(recomputed, plain)
    assert any(g.abs().sum() > 0 for g in grads[True] if g.ndim == 2)
