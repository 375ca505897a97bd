"""Policy rounds after reward rounds, through the real SecAgg+ workflow and ClientApp."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from client.store import PreferenceStore
from common.config import RunConfig
from common.model import load_base
from common.privacy import epsilon
from server.checkpoints import RunDirectory
from server.kl_controller import ERROR_CLIP
from server.phase_driver import PhaseDriver
from tests.inprocess_grid import InProcessGrid
from tests.test_secure_rounds import make_stores, run_config

POLICY = {
    "policy.objective": "ppo",
    "policy.advantage": "gae",  # the value head trains too (critic-free: its own test)
    "policy.samples-per-prompt": 1,
    "reward.rounds": 1,
    "policy.rounds": 2,
    "policy.iterations": 2,
    "policy.batch-size": 8,
    "policy.measure-prompts": 8,
    "policy.max-new-tokens": 8,
    "policy.optimizer": "adam",
    "policy.learning-rate": 0.01,
    "policy.kl-horizon": 50.0,
    # The trust region reads noised KL figures; at the tiny test sizes their noise
    # would make a round's acceptance chance. Tests of the trust region set a bound.
    "policy.kl-bound": 1e6,
}


def run_policy(tiny_base_dir, tmp_path, name, drop=lambda node, message: False, **overrides):
    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / name / "run", **{**POLICY, **overrides})
    grid = InProcessGrid(stores, flat, drop=drop)
    driver = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    return driver, driver.run_all(), grid, stores


def assert_beta_follows_the_controller(rounds: list[dict], config, beta: float) -> float:  # noqa: ANN001
    """Each round's beta is the previous one moved by Ziegler's rule on the
    aggregated (noised) KL and sample count; returns the final beta."""
    for h in rounds:
        assert h["samples"] >= 0
        assert h["beta"] == pytest.approx(beta)
        error = min(max(h["kl"] / config.kl_target - 1, -ERROR_CLIP), ERROR_CLIP)
        beta *= 1 + error * min(1.0, h["samples"] / config.kl_horizon)
        assert h["next_beta"] == pytest.approx(beta)
    return beta


def test_policy_rounds_follow_reward_rounds_and_move_beta_by_the_controller(
    tiny_base_dir, tmp_path
):
    driver, state, _, stores = run_policy(tiny_base_dir, tmp_path, "ppo")
    assert [(h["phase"], h["task"], h["round"]) for h in state.history] == [
        ("reward", "train", 1),
        ("reward", "evaluate", 1),
        ("policy", "train", 1),
        ("policy", "train", 2),
        ("policy", "evaluate", 2),
    ]
    policy_rounds = [h for h in state.history if h["phase"] == "policy" and h["task"] == "train"]
    config = driver.config.policy
    beta = assert_beta_follows_the_controller(policy_rounds, config, config.beta)
    for h in policy_rounds:
        # The trust region read the aggregated candidate, measured by all three clients.
        assert h["survivors"] == h["measure_survivors"] == 3 and h["kl_candidate"] >= 0
        assert "kl_after" not in h  # the training exchange sent the update only
        assert h["trust_region_scale"] == 1.0 and h["update_norm"] > 0
    # The policy's KL the controller read: the reference's (0) first, then the last
    # candidate's as accepted.
    assert policy_rounds[0]["kl"] == 0.0
    assert policy_rounds[1]["kl"] == pytest.approx(policy_rounds[0]["kl_candidate"])
    assert state.kl_controller["beta"] == pytest.approx(beta)

    # The policy moved; the reward model did not move in the policy rounds.
    run = RunDirectory(driver.config.run_dir)
    start = run.load(run.checkpoints / "policy-round-0000")
    final = run.load(run.checkpoints / "policy-round-0002")
    moved = [n for n in start.policy if not torch.equal(start.policy[n], final.policy[n])]
    assert len(moved) == len(start.policy)
    assert all(torch.equal(start.reward[n], final.reward[n]) for n in start.reward)
    assert final.state.kl_controller["beta"] == pytest.approx(beta)

    # The final adapter loads with PEFT alone and generates.
    base, tokenizer = load_base(str(tiny_base_dir))
    model = PeftModel.from_pretrained(base, str(run.checkpoints / "policy-round-0002" / "policy"))
    ids = tokenizer(["question 0-1?\n"], return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    # One ledger: the reward phase kept to its share, the whole run to the budget;
    # each policy round charges its training (prompts) and its statistics.
    run_config_ = driver.config
    for node_config in stores.values():
        with PreferenceStore(node_config["store"]) as store:
            ledger = store.ledger()
        assert [(e.phase, e.mechanism, e.unit) for e in ledger] == [
            ("reward", "training", "comparison"),
            ("reward", "statistics", "comparison"),
            # Each round: its training, then the measurement of the aggregated candidate.
            *[("policy", "training", "prompt"), ("policy", "statistics", "prompt")] * 2,
            ("policy", "statistics", "prompt"),
        ]
        assert all(e.status == "committed" for e in ledger)
        reward_eps = epsilon([e.event for e in ledger if e.phase == "reward"], 1e-5)
        total = epsilon([e.event for e in ledger], 1e-5)
        assert reward_eps <= run_config_.reward_epsilon + 1e-6
        assert reward_eps < total <= run_config_.privacy.epsilon + 1e-6
        training = [e.event for e in ledger if e.phase == "policy" and e.mechanism == "training"]
        assert training[0].noise_multiplier == training[1].noise_multiplier
        # One noise level for every statistics release of the run.
        assert len({e.event.noise_multiplier for e in ledger if e.mechanism == "statistics"}) == 1


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_rounds_train_the_adapter_and_leave_the_value_head(
    tiny_base_dir, tmp_path, advantage
):
    driver, state, _, stores = run_policy(
        tiny_base_dir,
        tmp_path,
        advantage,
        **{
            "policy.advantage": advantage,
            "policy.samples-per-prompt": 2,
            "policy.kl-penalty": "loss" if advantage == "grpo" else "reward",
            "policy.rounds": 1,
            "policy.batch-size": 4,
        },
    )
    assert [h["update_norm"] > 0 for h in state.history if h["task"] == "train"] == [True, True]
    run = RunDirectory(driver.config.run_dir)
    start = run.load(run.checkpoints / "policy-round-0000").policy
    final = run.load(run.checkpoints / "policy-round-0001").policy
    for name in start:
        assert torch.equal(start[name], final[name]) == name.startswith("value."), name
    for node_config in stores.values():
        with PreferenceStore(node_config["store"]) as store:
            units = [(e.phase, e.mechanism, e.unit) for e in store.ledger()]
        assert ("policy", "training", "prompt") in units


def test_frozen_lora_a_trains_the_b_matrices_only_under_dp(tiny_base_dir, tmp_path):
    driver, state, _, _ = run_policy(
        tiny_base_dir, tmp_path, "ffa", **{"policy.freeze-lora-a": True, "policy.rounds": 1}
    )
    run = RunDirectory(driver.config.run_dir)
    start = run.load(run.checkpoints / "policy-round-0000").policy
    final = run.load(run.checkpoints / "policy-round-0001").policy
    lora = [name for name in start if ".lora_" in name]
    assert lora and all(torch.equal(start[n], final[n]) == (".lora_A." in n) for n in lora)


KL_READ = {"aggregate": "kl_candidate", "local": "kl_after"}
"""What the trust region reads, by ``policy.trust-region-kl``."""


@pytest.mark.parametrize("trust_region_kl", ["aggregate", "local"])
def test_trust_region_rejects_a_step_past_the_bound_and_keeps_the_policy(
    tiny_base_dir, tmp_path, trust_region_kl
):
    driver, state, _, _ = run_policy(
        tiny_base_dir,
        tmp_path,
        "reject",
        **{
            "policy.trust-region-kl": trust_region_kl,
            "policy.kl-bound": 1e-6,
            "policy.kl-target": 1e-6,
            "policy.trust-region": "reject",
            "policy.rounds": 1,
            # Exact KL figures: no quantization, no statistics noise.
            "federation.secure-aggregation": False,
            "privacy.enabled": False,
        },
    )
    (h,) = [h for h in state.history if h["phase"] == "policy" and h["task"] == "train"]
    assert h[KL_READ[trust_region_kl]] > 1e-6 and h["trust_region_scale"] == 0.0
    assert ("kl_candidate" in h) == (trust_region_kl == "aggregate")
    assert h["trust_region"].startswith("rejected") and h["update_norm"] == 0.0
    run = RunDirectory(driver.config.run_dir)
    start = run.load(run.checkpoints / "policy-round-0000").policy
    final = run.load(run.checkpoints / "policy-round-0001").policy
    assert all(torch.equal(start[n], final[n]) for n in start)


@pytest.mark.parametrize("trust_region_kl", ["aggregate", "local"])
def test_trust_region_scales_a_step_back_to_the_bound(tiny_base_dir, tmp_path, trust_region_kl):
    # Exact KL figures: no quantization, no statistics noise.
    plain = {
        "federation.secure-aggregation": False,
        "privacy.enabled": False,
        "policy.rounds": 1,
        "policy.trust-region-kl": trust_region_kl,
    }
    proposed = KL_READ[trust_region_kl]
    free, _, _, _ = run_policy(tiny_base_dir, tmp_path, "free", **plain)
    (h_free,) = [h for h in free.state.history if h["phase"] == "policy" and h["task"] == "train"]
    # The fresh policy is the reference on the clients too (the trained reward adapter
    # that travels with it must not leak into it).
    assert abs(h_free["kl"]) < 1e-6
    assert h_free[proposed] > 0
    bound = h_free["kl"] + 0.5 * (h_free[proposed] - h_free["kl"])
    scaled, _, _, _ = run_policy(
        tiny_base_dir,
        tmp_path,
        "scaled",
        **plain,
        **{"policy.kl-bound": bound, "policy.kl-target": bound},
    )
    (h,) = [h for h in scaled.state.history if h["phase"] == "policy" and h["task"] == "train"]
    assert h["trust_region_scale"] == pytest.approx(0.5, abs=1e-3)
    assert h["update_norm"] == pytest.approx(0.5 * h_free["update_norm"], rel=1e-3)


def test_trust_region_shrink_pulls_the_stepped_policy_back_towards_the_reference(
    tiny_base_dir, tmp_path
):
    plain = {"federation.secure-aggregation": False, "privacy.enabled": False, "policy.rounds": 1}
    free, _, _, _ = run_policy(tiny_base_dir, tmp_path, "free", **plain)
    (h_free,) = [h for h in free.state.history if h["phase"] == "policy" and h["task"] == "train"]
    assert h_free["kl_candidate"] > 0
    bound = h_free["kl_candidate"] / 4  # KL x shrink^2 = bound: shrink 0.5
    shrunk, _, _, _ = run_policy(
        tiny_base_dir,
        tmp_path,
        "shrunk",
        **plain,
        **{"policy.kl-bound": bound, "policy.kl-target": bound, "policy.trust-region": "shrink"},
    )
    (h,) = [h for h in shrunk.state.history if h["phase"] == "policy" and h["task"] == "train"]
    assert (h["trust_region_scale"], h["trust_region_shrink"]) == (1.0, pytest.approx(0.5))
    assert h["trust_region"].startswith("shrunk by 0.500")
    assert shrunk.state.policy_kl == pytest.approx(bound)
    final = {}
    for name, driver in (("free", free), ("shrunk", shrunk)):
        run = RunDirectory(driver.config.run_dir)
        final[name] = run.load(run.checkpoints / "policy-round-0001").policy
    for name, tensor in final["free"].items():
        factor = 0.5 if "lora_B" in name else 1.0
        torch.testing.assert_close(final["shrunk"][name], factor * tensor, msg=name)


def test_dpo_objective_trains_the_policy_on_local_comparisons(tiny_base_dir, tmp_path):
    driver, state, _, stores = run_policy(
        tiny_base_dir, tmp_path, "dpo", **{"policy.objective": "dpo", "reward.rounds": 0}
    )
    assert [(h["phase"], h["task"]) for h in state.history] == [
        ("policy", "train"),
        ("policy", "train"),
        ("policy", "evaluate"),
    ]
    trained = [h for h in state.history if h["task"] == "train"]
    assert all(h["update_norm"] > 0 for h in trained)
    # DPO's beta starts at policy.dpo-beta and the KL controller moves it, as PPO's.
    config = driver.config.policy
    assert_beta_follows_the_controller(trained, config, config.dpo_beta)
    for node_config in stores.values():
        with PreferenceStore(node_config["store"]) as store:
            ledger = store.ledger()
        assert [(e.mechanism, e.unit) for e in ledger] == [
            *[("training", "comparison"), ("statistics", "prompt")] * 2,
            ("statistics", "prompt"),
        ]
        # Without reward rounds the policy phase may spend the whole budget.
        assert 7.0 < epsilon([e.event for e in ledger], 1e-5) <= 8.0 + 1e-6


def test_restarted_server_resumes_policy_rounds_with_beta(tiny_base_dir, tmp_path):
    overrides = {"federation.secure-aggregation": False, "policy.rounds": 3}
    straight, _, _, _ = run_policy(tiny_base_dir, tmp_path, "straight", **overrides)

    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / "resumed" / "run", **{**POLICY, **overrides})
    # Server rounds: reward 1 + evaluation = 2, policy round 1 = 3 + its measure 4;
    # round 2 never arrives.
    broken = InProcessGrid(
        stores, flat, drop=lambda node, message: int(message.metadata.group_id) >= 5
    )
    with pytest.raises(RuntimeError, match="failed 3 times"):
        PhaseDriver(broken, broken.server_context, RunConfig.from_flower(flat)).run_all()
    assert RunDirectory(tmp_path / "resumed" / "run").latest().name == "policy-round-0001"

    grid = InProcessGrid(stores, flat)
    grid.contexts = broken.contexts
    resumed = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    state = resumed.run_all()
    assert [(h["phase"], h["round"]) for h in state.history][-4:] == [
        ("policy", 1),
        ("policy", 2),
        ("policy", 3),
        ("policy", 3),
    ]
    policy_rounds = [h for h in state.history if h["phase"] == "policy" and h["task"] == "train"]
    assert policy_rounds[1]["beta"] == pytest.approx(policy_rounds[0]["next_beta"])
    # Same seeds for the same (phase, round, attempt): the resumed run ends where the
    # uninterrupted one does, except for the retried round's attempt numbers.
    assert state.kl_controller["beta"] > 0
    assert resumed.state.round == straight.state.round == 3
