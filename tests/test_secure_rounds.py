"""Reward rounds through the real SecAgg+ workflow and ClientApp, in one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.app import app as client_app
from client.store import NewComparison, PreferenceStore, StaleRound
from common.config import RunConfig
from common.model import load_base
from common.privacy import epsilon
from server.checkpoints import RunDirectory
from server.phase_driver import PhaseDriver
from tests.inprocess_grid import InProcessGrid

NODES = [11, 22, 33]


def make_stores(stores_dir) -> dict[int, dict]:
    """Fresh stores; the same paths give the same client seeds (DP noise, sampling)."""
    configs = {}
    for i, node in enumerate(NODES):
        path = stores_dir / f"org-{i}.sqlite"
        for stale in stores_dir.glob(f"org-{i}.sqlite*"):
            stale.unlink()
        with PreferenceStore(path) as store:
            store.add_comparisons(
                [
                    NewComparison(
                        f"question {i}-{k}?",
                        f"a fine answer {k}",
                        f"a poor reply {k % 7}",
                        f"sim-{i}",
                    )
                    for k in range(40 + 10 * i)
                ],
                source="simulated",
            )
        configs[node] = {"store": str(path), "partition-id": i}
    return configs


def run_config(tiny_base_dir, run_dir, **overrides) -> dict:
    config = RunConfig().replace(
        **{
            "model.base": str(tiny_base_dir),
            "run-dir": str(run_dir),
            "reward.rounds": 2,
            "reward.batch-size": 8,
            "federation.min-clients": 2,
            "federation.round-timeout": 60.0,
            **overrides,
        }
    )
    return config.to_flower()


def run(tiny_base_dir, tmp_path, name, drop=lambda node, message: False, **overrides):
    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / name / "run", **overrides)
    grid = InProcessGrid(stores, flat, drop=drop)
    driver = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    state = driver.run_all()
    return driver, state, grid, stores


def assert_equal_within_quantization(got: dict, expected: dict) -> None:
    """SecAgg+ rounds each value stochastically (unseeded) to a grid of this step."""
    federation = RunConfig().federation
    step = 2 * federation.secagg_clipping_range / federation.secagg_quantization_range
    for name, tensor in expected.items():
        diff = (got[name] - tensor).abs().max().item()
        assert diff < 10 * step, (name, diff)


def test_secagg_round_equals_plain_fedavg(tiny_base_dir, tmp_path):
    secure, _, _, _ = run(tiny_base_dir, tmp_path, "secure")
    plain, _, _, _ = run(
        tiny_base_dir, tmp_path, "plain", **{"federation.secure-aggregation": False}
    )
    assert_equal_within_quantization(secure.weights, plain.weights)
    moved = sum((secure.weights[n] - plain.weights[n]).numel() for n in secure.weights)
    assert moved > 0
    # Metrics through the mask equal the plain ones (counts exactly).
    for a, b in zip(secure.state.history, plain.state.history, strict=True):
        assert a["fed_eval_pairs"] == b["fed_eval_pairs"] > 0
        assert a["fed_eval_accuracy"] == b["fed_eval_accuracy"]
        assert a["epsilon_mean"] == pytest.approx(b["epsilon_mean"], abs=1e-3)


def test_every_client_message_carries_no_text_tokens_or_per_example_values(tiny_base_dir, tmp_path):
    driver, _, grid, stores = run(tiny_base_dir, tmp_path, "inspect")
    texts = set()
    for cfg in stores.values():
        with PreferenceStore(cfg["store"]) as store:
            for c in store.comparisons():
                texts |= {c.prompt, c.chosen, c.rejected}
    _, tokenizer = load_base(str(tiny_base_dir))
    token_runs = {bytes(np.array(tokenizer(t)["input_ids"], dtype=np.int64)) for t in texts}
    assert grid.sent_by_clients
    for node, message in grid.sent_by_clients:
        content = message.content
        # Only SecAgg+ protocol values and the legacy status; no metrics in clear, and
        # num_examples is always 1 so the data size does not travel either.
        allowed = {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.status"}
        assert set(content.config_records) <= allowed, content.config_records.keys()
        assert not dict(content.config_records.get("fitres.metrics", {}))
        for name, record in content.metric_records.items():
            assert name == "fitres.num_examples" and dict(record) == {"num_examples": 1}, (
                name,
                dict(record),
            )
        blob = json.dumps({k: str(dict(v)) for k, v in content.config_records.items()})
        for record in content.array_records.values():
            for array in record.values():
                blob += array.data.hex()
                for run_ in token_runs:
                    assert run_ not in array.data
        for text in texts:
            assert text not in blob, f"node {node} sent text {text!r}"


def test_round_survives_a_dropout_and_the_dropped_client_still_pays(tiny_base_dir, tmp_path):
    dead = NODES[1]

    def drop(node, message):  # node 22 dies after receiving its instructions (stage 2)
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return (
            node == dead
            and configs is not None
            and configs.get("stage") == "collect_masked_vectors"
        )

    driver, state, _, stores = run(tiny_base_dir, tmp_path, "dropout", drop=drop)
    assert state.finished
    trained = [h for h in state.history if h["task"] == "train"]
    assert all(h["survivors"] == 2 and h["dropped_nodes"] == [dead] for h in trained)
    # It "died" before training in this harness, so it spent nothing; the survivors did.
    for node, cfg in stores.items():
        with PreferenceStore(cfg["store"]) as store:
            spent = epsilon(store.privacy_events(), 1e-5)
        assert (spent == 0.0) if node == dead else (0 < spent <= 8.0)


def test_budget_exhausted_client_declines_with_a_reason(tiny_base_dir, tmp_path, caplog):
    overrides = {"privacy.noise": "fixed", "privacy.noise-multiplier": 0.3, "privacy.epsilon": 1.0}
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="failed 3 times"):
        run(tiny_base_dir, tmp_path, "budget", **overrides)
    assert "above the budget of 1.0" in caplog.text


def test_server_refuses_nan_aggregate_and_keeps_the_model(tiny_base_dir, tmp_path, monkeypatch):
    import client.reward_round as rr

    original = rr.pack_update

    def poisoned(update, spec, stats, clip):
        arrays = original(update, spec, stats, clip)
        if spec:
            arrays[0] = arrays[0].copy()
            arrays[0][0] = np.nan  # quantization maps NaN to garbage; plain rounds see it
        return arrays

    monkeypatch.setattr(rr, "pack_update", poisoned)
    with pytest.raises(RuntimeError, match="failed 3 times"):
        run(tiny_base_dir, tmp_path, "nan", **{"federation.secure-aggregation": False})
    run_dir = RunDirectory(tmp_path / "nan" / "run")
    assert run_dir.latest().name == "reward-round-0000"  # the initial model is intact


def test_clients_refuse_malformed_global_weights(tiny_base_dir, tmp_path):
    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / "hostile" / "run")
    grid = InProcessGrid(stores, flat)
    driver = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    name = driver.spec[0].name
    driver.weights[name] = torch.full_like(driver.weights[name], float("inf"))
    with pytest.raises(RuntimeError, match="failed 3 times"):
        driver.run_all()
    reasons = [m.error.reason for _, m in grid.sent_by_clients if m.has_error()]
    assert reasons and all(f"tensor {name!r} holds" in r and "NaN/Inf" in r for r in reasons)


def test_restarted_server_resumes_and_ends_like_an_uninterrupted_run(tiny_base_dir, tmp_path):
    straight, _, _, _ = run(tiny_base_dir, tmp_path, "straight", **{"reward.rounds": 3})

    # Every attempt at round 2 loses all clients before they train: the server stops.
    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / "resumed" / "run", **{"reward.rounds": 3})
    broken = InProcessGrid(
        stores, flat, drop=lambda node, message: message.metadata.group_id in {"2", "3", "4"}
    )
    with pytest.raises(RuntimeError, match="failed 3 times"):
        PhaseDriver(broken, broken.server_context, RunConfig.from_flower(flat)).run_all()
    run_dir = RunDirectory(tmp_path / "resumed" / "run")
    assert run_dir.latest().name == "reward-round-0001"

    grid = InProcessGrid(stores, flat)
    grid.contexts = broken.contexts  # the clients kept running; only the server restarted
    resumed = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    state = resumed.run_all()
    assert state.finished and [h["round"] for h in state.history] == [1, 2, 3, 3]
    assert_equal_within_quantization(resumed.weights, straight.weights)


def test_client_refuses_a_replayed_round_before_touching_its_data(tiny_base_dir, tmp_path):
    _, _, grid, stores = run(
        tiny_base_dir, tmp_path, "replay", **{"federation.secure-aggregation": False}
    )
    node, first_round = grid.delivered[0]  # round 1 as the client received it
    store_file = stores[node]["store"]
    with PreferenceStore(store_file) as store:
        before = store.snapshot()
    replayed = grid.deliver(node, first_round)
    with pytest.raises(StaleRound, match="server round 1 of run .* refused as stale or replayed"):
        client_app(replayed, grid.contexts[node])
    with PreferenceStore(store_file) as store:
        assert store.snapshot() == before  # no training, no new ledger charge


def test_restarted_server_never_reuses_a_round_number(tiny_base_dir, tmp_path):
    stores = make_stores(tmp_path / "stores")
    flat = run_config(tiny_base_dir, tmp_path / "run", **{"reward.rounds": 1})
    grid = InProcessGrid(stores, flat, drop=lambda node, message: True)
    with pytest.raises(RuntimeError, match="failed 3 times"):
        PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat)).run_all()
    restarted = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    restarted._resume_or_start()
    assert restarted.state.server_round == 3  # the three failed attempts stay spent
