"""SecAgg+'s share graph: sized like log n, its threshold and dropout tolerance, and
a sparse round through Flower's real workflow."""

from __future__ import annotations

import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from scipy.stats import binom

from client.store import NewComparison, PreferenceStore
from common.config import ConfigError, FederationConfig, RunConfig
from server.phase_driver import PhaseDriver
from server.share_graph import failure_bound, share_graph, threshold_for
from tests.inprocess_grid import InProcessGrid
from tests.test_secure_rounds import assert_equal_within_quantization


def federation(**settings) -> FederationConfig:
    return RunConfig().replace(**{f"federation.{k}": v for k, v in settings.items()}).federation


@pytest.mark.parametrize(
    ("clients", "shares", "threshold"),
    [(3, 3, 2), (10, 10, 6), (20, 15, 8), (30, 17, 9), (100, 19, 10), (1000, 23, 12)],
)
def test_default_graph_grows_like_log_n(clients, shares, threshold):
    graph = share_graph(clients, RunConfig().federation)
    assert (graph.shares, graph.threshold) == (shares, threshold)
    assert graph.tolerated_dropouts == shares - threshold
    # Up to 10 clients even the complete graph cannot meet the bound; it is what there is.
    assert graph.failure_bound <= 1e-3 or shares == clients


def test_auto_picks_the_smallest_odd_k_within_the_failure_bound():
    fed = RunConfig().federation
    for clients in (20, 30, 100, 1000):
        graph = share_graph(clients, fed)
        smaller = graph.shares - 2
        assert failure_bound(clients, smaller, threshold_for(smaller, 0.5), 0.1) > 1e-3


def test_failure_bound_is_the_union_bound_over_neighbourhoods():
    # Some neighbourhood of 19 loses more than 19 - 10 = 9 shares: Binomial tail, times n.
    assert failure_bound(100, 19, 10, 0.1) == pytest.approx(100 * binom.sf(9, 19, 0.1), rel=1e-9)
    assert failure_bound(5, 5, 3, 0.0) == 0.0
    assert failure_bound(10**6, 3, 2, 0.4) == 1.0  # capped


def test_threshold_is_a_strict_majority_of_the_shares():
    assert [threshold_for(k, 0.5) for k in (3, 4, 5, 19)] == [2, 3, 3, 10]
    assert threshold_for(10, 0.7) == 8
    assert threshold_for(3, 0.99) == 3  # never more than all


def test_explicit_settings():
    assert share_graph(100, federation(**{"secagg-shares": "all"})).shares == 100
    assert share_graph(100, federation(**{"secagg-shares": "7"})).shares == 7
    assert share_graph(5, federation(**{"secagg-shares": "7"})).shares == 5  # at most n
    graph = share_graph(100, federation(**{"secagg-shares": "7", "secagg-threshold": 0.7}))
    assert graph.threshold == 5 and graph.tolerated_dropouts == 2
    assert "7 of 100, threshold 5: survives any 2 dropouts" in graph.describe()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("secagg-shares", "2", "number of shares >= 3"),
        ("secagg-shares", "half", "'auto', 'all' or a number"),
        ("secagg-threshold", 1.0, r"secagg-threshold must be in \[0.5, 1\)"),
        ("secagg-threshold", 0.4, r"secagg-threshold must be in \[0.5, 1\)"),
        ("secagg-dropout", 0.5, r"secagg-dropout must be in \[0, 0.5\)"),
        ("secagg-failure", 0.0, r"secagg-failure must be in \(0, 1\)"),
        ("poll-interval", 0.0, "poll-interval must be > 0"),
    ],
)
def test_bad_settings_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().replace(**{f"federation.{key}": value})


SPARSE_NODES = [101, 102, 103, 104, 105]


def sparse_run(tiny_base_dir, tmp_path, name, drop=lambda node, message: False, **overrides):
    stores = {}
    for i, node in enumerate(SPARSE_NODES):
        # The same paths in both runs give the same client seeds (DP noise, sampling).
        path = tmp_path / "stores" / f"org-{i}.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"org-{i}.sqlite*"):
            stale.unlink()
        with PreferenceStore(path) as store:
            store.add_comparisons(
                [
                    NewComparison(f"q {i}-{k}?", f"a fine answer {k}", f"poor {k % 5}", "a")
                    for k in range(24)
                ],
                source="simulated",
            )
        stores[node] = {"store": str(path), "partition-id": i}
    flat = (
        RunConfig()
        .replace(
            **{
                "model.base": str(tiny_base_dir),
                "run-dir": str(tmp_path / name / "run"),
                "reward.rounds": 1,
                "reward.batch-size": 8,
                "reward.learning-rate": 0.2,
                "reward.local-epochs": 1.0,
                "policy.rounds": 0,
                "federation.min-clients": 3,
                # Replies come back as they are pushed in process; only a dropout waits.
                "federation.round-timeout": 5.0,
                # Seeded noise: the SecAgg+ and the plain round must train alike.
                "privacy.secure-noise": False,
                **overrides,
            }
        )
        .to_flower()
    )
    grid = InProcessGrid(stores, flat, drop=drop)
    driver = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat))
    state = driver.run_all()
    return driver, state, grid


def test_sparse_round_equals_plain_fedavg_and_survives_a_dropout(tiny_base_dir, tmp_path):
    """Five clients, three shares each (a ring), one dropout after masking."""

    def drop_at_unmask(node, message):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return node == SPARSE_NODES[2] and configs is not None and configs.get("stage") == "unmask"

    sparse, state, grid = sparse_run(
        tiny_base_dir,
        tmp_path,
        "sparse",
        drop=drop_at_unmask,
        **{"federation.secagg-shares": "3"},
    )
    plain, _, _ = sparse_run(
        tiny_base_dir, tmp_path, "plain", **{"federation.secure-aggregation": False}
    )
    assert_equal_within_quantization(sparse.weights["reward"], plain.weights["reward"])
    train = next(h for h in state.history if h["task"] == "train")
    assert train["secagg"]["shares"] == 3 and train["secagg"]["threshold"] == 2
    assert train["dropped_nodes"] == [SPARSE_NODES[2]] and train["survivors"] == 5
    # Each client sent key shares to its two ring neighbours only, not to all four others.
    share_keys = [
        m
        for _, m in grid.sent_by_clients
        if (c := m.content.config_records.get(RECORD_KEY_CONFIGS)) is not None and "dsts" in c
    ]
    assert share_keys and all(
        len(m.content.config_records[RECORD_KEY_CONFIGS]["dsts"]) == 2 for m in share_keys
    )
