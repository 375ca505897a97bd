"""Reward rounds through the real SecAgg+ workflow and ClientApp, in one process."""

from __future__ import annotations

import json

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.app import app as client_app
from client.store import NewComparison, PreferenceStore, StaleRound
from common.config import RunConfig
from common.model import load_base
from common.privacy import RoundDeclined, epsilon
from common.wire import WireError
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
            # Stores of 40-60 comparisons, batches of 8: a smaller step than the
            # defaults' (sized for batches of 256) keeps DP-SGD stable.
            "reward.batch-size": 8,
            "reward.learning-rate": 0.2,
            "reward.local-epochs": 1.0,
            "policy.rounds": 0,
            "federation.min-clients": 2,
            # In process every reply is there as soon as its message is pushed, so the
            # timeout is only ever waited out by a node that drops.
            "federation.round-timeout": 5.0,
            # Reproducible noise: resumed and uninterrupted runs must end identical.
            "privacy.secure-noise": False,
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
    assert_equal_within_quantization(secure.weights["reward"], plain.weights["reward"])
    moved = sum(
        (secure.weights["reward"][n] - plain.weights["reward"][n]).numel()
        for n in secure.weights["reward"]
    )
    assert moved > 0
    # The final evaluation's (noised, same seeds) figures through the mask equal the
    # plain ones, but for a pair or two that the quantized model ranks differently.
    a, b = secure.state.history[-1], plain.state.history[-1]
    assert a["task"] == "evaluate" and a["fed_eval_pairs"] == b["fed_eval_pairs"]
    pairs = max(1, a["fed_eval_pairs"])
    assert a["fed_eval_accuracy"] == pytest.approx(b["fed_eval_accuracy"], abs=2.5 / pairs)


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


@pytest.mark.parametrize(
    ("stage", "trained"),
    [
        ("setup", False),
        ("share_keys", False),  # gone before it saw the model
        ("collect_masked_vectors", False),  # got the model, died before training
        ("unmask", True),  # trained and sent its masked update, then died
    ],
)
def test_round_survives_a_dropout_at_each_secagg_stage(tiny_base_dir, tmp_path, stage, trained):
    dead = NODES[1]

    def drop(node, message):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return node == dead and configs is not None and configs.get("stage") == stage

    driver, state, _, stores = run(tiny_base_dir, tmp_path, f"drop-{stage}", drop=drop)
    assert state.finished
    for h in state.history:
        assert h["dropped_nodes"] == [dead], h  # logged by node id
        # A client that dies after sending its masked update is still in the sum.
        assert h["survivors"] == (3 if stage == "unmask" else 2)
    # The dead client's ledger charges exactly what it spent.
    for node, cfg in stores.items():
        with PreferenceStore(cfg["store"]) as store:
            spent = epsilon(store.privacy_events(), 1e-5)
        if node == dead and not trained:
            assert spent == 0.0
        else:
            assert 0 < spent <= 8.0


def test_round_below_min_clients_fails_cleanly_and_is_retried(tiny_base_dir, tmp_path, caplog):
    def drop(node, message):  # node 22 is unreachable during the first attempt only
        return node == NODES[1] and message.metadata.group_id == "1"

    with caplog.at_level("ERROR"):
        _, state, _, _ = run(
            tiny_base_dir,
            tmp_path,
            "retry",
            drop=drop,
            **{"federation.min-clients": 3},
        )
    assert "reward round 1 attempt 1 failed: 2 survivors < federation.min-clients 3" in caplog.text
    assert [h["survivors"] for h in state.history] == [3, 3, 3]
    assert state.server_round == 4  # round 1 twice, round 2, the final evaluation


def test_client_crashing_mid_training_keeps_its_charge_and_the_round_goes_on(
    tiny_base_dir, tmp_path, monkeypatch
):
    import client.reward_round as rr

    original = rr.train_reward_model
    crashing_store = "org-1.sqlite"

    def crash_for_one_store(model, pairs, **kwargs):
        if any(p.endswith(crashing_store) for p in crash_for_one_store.store_paths):
            raise MemoryError("simulated crash mid-training")
        return original(model, pairs, **kwargs)

    crash_for_one_store.store_paths = []
    original_round = rr.reward_round

    def tracking_round(config, store, *args, **kwargs):
        crash_for_one_store.store_paths[:] = [str(store.path)]
        return original_round(config, store, *args, **kwargs)

    monkeypatch.setattr(rr, "train_reward_model", crash_for_one_store)
    monkeypatch.setattr("client.round_handler.reward_round", tracking_round)
    _, state, _, stores = run(tiny_base_dir, tmp_path, "crash", **{"reward.rounds": 1})
    assert state.history[0]["survivors"] == 2 and state.history[0]["dropped_nodes"] == [NODES[1]]
    with PreferenceStore(stores[NODES[1]]["store"]) as store:
        ledger = store.ledger()
    # The charge was written before training started: pending, and counted in full;
    # the final evaluation's statistics release after it is committed.
    assert [(e.mechanism, e.status) for e in ledger] == [
        ("training", "pending"),
        ("statistics", "committed"),
    ]
    assert epsilon([e.event for e in ledger], 1e-5) > 0


def test_budget_exhausted_client_declines_with_a_reason(tiny_base_dir, tmp_path, caplog):
    overrides = {"privacy.noise": "fixed", "privacy.noise-multiplier": 0.3, "privacy.epsilon": 1.0}
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="failed 3 times"):
        run(tiny_base_dir, tmp_path, "budget", **overrides)
    # The server learns that the clients declined, in a constant text; the figures
    # behind it (epsilon planned and spent) stay in each client's own log.
    server = [r.getMessage() for r in caplog.records if r.name == "server.phase_driver"]
    dropped = [m for m in server if "dropped at" in m]
    assert dropped and all(m.endswith(f"RoundDeclined: {RoundDeclined.MESSAGE}") for m in dropped)
    assert not any("budget of 1.0" in m for m in server)
    client = [r.getMessage() for r in caplog.records if r.name == "client.round_handler"]
    assert any("above the budget of 1.0" in m for m in client)


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
    name = driver.spec["reward"][0].name
    driver.weights["reward"][name] = torch.full_like(driver.weights["reward"][name], float("inf"))
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
    assert_equal_within_quantization(resumed.weights["reward"], straight.weights["reward"])


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


@pytest.mark.parametrize("secure", [True, False])
@pytest.mark.parametrize("attack", ["extra tensor", "wrong shape", "oversized"])
def test_one_hostile_reply_is_refused_and_the_round_goes_on(
    tiny_base_dir, tmp_path, monkeypatch, secure, attack
):
    import client.round_handler as handler

    original = handler.reward_round

    def hostile_for_one_store(config, store, *args, **kwargs):
        arrays = original(config, store, *args, **kwargs)
        if not str(store.path).endswith("org-1.sqlite") or len(arrays) < 2:
            return arrays
        if attack == "extra tensor":
            return [*arrays, np.zeros(3, dtype=np.float32)]
        if attack == "wrong shape":
            return [arrays[0][:1], *arrays[1:]]
        return [np.zeros(3_000_000, dtype=np.float32), *arrays[1:]]  # 12 MB

    monkeypatch.setattr(handler, "reward_round", hostile_for_one_store)
    _, state, _, _ = run(
        tiny_base_dir,
        tmp_path,
        f"hostile-{secure}-{attack}",
        **{"reward.rounds": 1, "federation.secure-aggregation": secure},
    )
    trained = state.history[0]
    assert trained["survivors"] == 2 and trained["dropped_nodes"] == [NODES[1]]


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (
            lambda a: [a[0][:1], *a[1:]],
            r"tensor 'adapter\..*' has shape \(1, 64\), expected \(4, 64\)",
        ),
        (lambda a: [a[0].astype(np.float64), *a[1:]], r"tensor 'adapter\..*' has dtype float64"),
        (lambda a: [np.full_like(a[0], np.nan), *a[1:]], r"tensor 'adapter\..*' holds \d+ NaN/Inf"),
        (lambda a: [np.full_like(a[0], np.inf), *a[1:]], r"tensor 'adapter\..*' holds \d+ NaN/Inf"),
        (lambda a: a[:-1], r"\d+ tensors arrived, expected \d+"),
        (lambda a: [*a, a[0]], r"\d+ tensors arrived, expected \d+"),
        (
            lambda a: [np.zeros(4_000_000, np.float32), *a[1:]],
            r"tensor 'adapter\..*' has shape \(4000000,\)",
        ),
    ],
    ids=["shape", "dtype", "nan", "inf", "missing", "extra", "oversized"],
)
def test_client_refuses_tampered_global_weights_naming_the_tensor(
    tiny_base_dir, tmp_path, tamper, error
):
    _, _, grid, stores = run(
        tiny_base_dir,
        tmp_path,
        "tamper",
        **{"federation.secure-aggregation": False, "reward.rounds": 1},
    )
    node, message = grid.delivered[0]
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    fitins.parameters = ndarrays_to_parameters(tamper(parameters_to_ndarrays(fitins.parameters)))
    fitins.config["server_round"] = 99  # a fresh round number: not refused as a replay
    tampered = Message(
        content=compat.fitins_to_recorddict(fitins, keep_input=True),
        dst_node_id=node,
        message_type=message.metadata.message_type,
        group_id="99",
    )
    with PreferenceStore(stores[node]["store"]) as store:
        before = store.snapshot()
    with pytest.raises(WireError, match=error):
        client_app(grid.deliver(node, tampered), grid.contexts[node])
    with PreferenceStore(stores[node]["store"]) as store:
        assert store.snapshot() == before  # nothing trained, charged or lost


def test_prv_planning_buys_less_noise_for_the_same_budget(tiny_base_dir, tmp_path):
    """``privacy.accountant = "prv"``: rounds plan and check with Opacus's PRV bound,
    which fits the same budget with less noise than RDP; by PRV the ledger is within
    budget, by RDP (looser) the same ledger would not be."""
    plain = {"federation.secure-aggregation": False}
    ledgers = {}
    for kind in ("rdp", "prv"):
        _, _, _, stores = run(
            tiny_base_dir, tmp_path, kind, **plain, **{"privacy.accountant": kind}
        )
        with PreferenceStore(stores[NODES[0]]["store"]) as store:
            ledgers[kind] = store.ledger()
    noise = {
        kind: [e.event.noise_multiplier for e in ledger if e.mechanism == "training"]
        for kind, ledger in ledgers.items()
    }
    assert all(p < 0.95 * r for p, r in zip(noise["prv"], noise["rdp"], strict=True)), noise
    events = [e.event for e in ledgers["prv"]]
    assert epsilon(events, 1e-5, "prv") <= 8.0 * (1 + 1e-6) < epsilon(events, 1e-5, "rdp")
