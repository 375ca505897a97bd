import random

import pytest
import torch
from opacus import GradSampleModule

from client.reward_training import DPSettings, OptimizerSettings, _pair_loss, train_reward_model
from common.config import ModelConfig
from common.losses import bradley_terry_loss
from common.model import build_reward_model, encode_pairs, load_base, load_reward_model, score_pairs
from common.privacy import accountant_for

WORDS = ["apple", "river", "stone", "cloud", "green", "quiet", "metal", "paper"]


def toy_pairs(tokenizer, n: int, seed: int):
    """Chosen responses praise ('great, thanks'), rejected ones complain: learnable by any RM."""
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        topic = " ".join(rng.choices(WORDS, k=3))
        prompts.append(f"Tell me about {topic}.")
        chosen.append(f"{rng.choice(WORDS)} is great, thanks {rng.choice(WORDS)}")
        rejected.append(f"{rng.choice(WORDS)} is awful, go away {rng.choice(WORDS)}")
    return encode_pairs(tokenizer, prompts, chosen, rejected, 48)


@pytest.fixture()
def model_and_tokenizer(tiny_base_dir):
    base, tokenizer = load_base(str(tiny_base_dir))
    return build_reward_model(base, ModelConfig(), seed=0), tokenizer


def _perturb(model):
    with torch.no_grad():  # LoRA B starts at zero; give every tensor a gradient
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn_like(tensor) * 0.05)


def test_one_gradient_row_per_comparison_equal_to_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    _perturb(model)
    pairs = toy_pairs(tokenizer, 6, seed=1)
    batch = (pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask)
    params = [p for p in model.parameters() if p.requires_grad]

    model.train()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    _pair_loss(wrapped, batch).backward()
    per_sample = [p.grad_sample.detach().clone() for p in params]
    wrapped._close()
    for p in params:
        p.grad = None
    assert all(g.shape[0] == len(pairs) for g in per_sample), (
        "one row per comparison, not per sequence"
    )

    for i in range(len(pairs)):
        single = tuple(t[i : i + 1] for t in batch)
        loss = bradley_terry_loss(model(*single[:2]), model(*single[2:]))
        grads = torch.autograd.grad(loss, params)
        for g_single, g_rows in zip(grads, per_sample, strict=True):
            torch.testing.assert_close(g_rows[i], g_single, rtol=1e-4, atol=1e-6)


def test_dp_training_changes_every_tensor_and_improves_heldout(
    model_and_tokenizer, tmp_path, tiny_base_dir
):
    model, tokenizer = model_and_tokenizer
    train, heldout = toy_pairs(tokenizer, 256, seed=2), toy_pairs(tokenizer, 128, seed=3)
    before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    accuracy_before = (score_pairs(model, heldout) > 0).float().mean().item()

    accountant = accountant_for([])
    result = train_reward_model(
        model,
        train,
        steps=60,
        batch_size=32,
        optimizer=OptimizerSettings("adam", 5e-3),
        dp=DPSettings(noise_multiplier=0.6, max_grad_norm=1.0),
        accountant=accountant,
        seed=0,
    )
    assert result.event is not None and accountant.history == [(0.6, 1 / 8, 60)]
    after = model.trainable_state()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"tensors DP training left unchanged: {unchanged}"
    assert all(not hasattr(p, "grad_sample") for p in model.parameters()), (
        "Opacus hooks left behind"
    )

    # Saved, loaded back through PEFT, the adapter scores unseen pairs better than before.
    adapter_dir = model.save_pretrained(tmp_path / "trained")
    fresh, _ = load_base(str(tiny_base_dir))
    loaded = load_reward_model(fresh, adapter_dir)
    accuracy_after = (score_pairs(loaded, heldout) > 0).float().mean().item()
    assert accuracy_after >= 0.9 and accuracy_after > accuracy_before + 0.2, (
        accuracy_before,
        accuracy_after,
    )


def test_empty_poisson_batches_still_take_a_noise_step(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    pairs = toy_pairs(tokenizer, 3, seed=4)
    calls = {"noise_only": 0}
    import client.reward_training as rt

    original = rt.noise_only_step

    def counting(optimizer, params):
        calls["noise_only"] += 1
        original(optimizer, params)

    monkeypatch.setattr(rt, "noise_only_step", counting)
    before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    accountant = accountant_for([])
    train_reward_model(
        model,
        pairs,
        steps=30,
        batch_size=1,
        optimizer=OptimizerSettings("sgd", 0.1, 0.9),
        dp=DPSettings(1.0, 1.0),
        accountant=accountant,
        seed=0,
    )
    assert calls["noise_only"] > 0  # (2/3)^3 per step: some steps drew nobody
    assert accountant.history == [(1.0, 1 / 3, 30)]  # every step is accounted
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state().items())


def test_non_dp_training_claims_no_privacy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = train_reward_model(
        model,
        toy_pairs(tokenizer, 16, 5),
        steps=3,
        batch_size=8,
        optimizer=OptimizerSettings("sgd", 0.1, 0.9),
        dp=None,
    )
    assert result.event is None and result.steps == 3


def test_seeded_dp_runs_repeat_and_secure_ones_never_do(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = toy_pairs(tokenizer, 16, seed=5)
    start = {k: v.detach().clone() for k, v in model.trainable_state().items()}

    def run(secure: bool) -> dict[str, torch.Tensor]:
        model.load_trainable_state(start)
        train_reward_model(
            model,
            pairs,
            steps=3,
            batch_size=4,
            optimizer=OptimizerSettings("sgd", 0.1),
            dp=DPSettings(1.0, 1.0, secure=secure),
            accountant=accountant_for([]),
            seed=7,
        )
        return {k: v.detach().clone() for k, v in model.trainable_state().items()}

    seeded, secure = [run(False), run(False)], [run(True), run(True)]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in start)
    assert all(not torch.equal(secure[0][k], secure[1][k]) for k in start)
    assert all(not torch.equal(secure[0][k], start[k]) for k in start)
