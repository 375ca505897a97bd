"""The round timeline: the server's stages, each client's own parts, and their join."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.round_timeline import read_timeline
from simulations.round_timeline import round_breakdown, round_timeline
from tests.test_secure_rounds import run

SECAGG_STAGES = [
    "secagg:setup",
    "secagg:share_keys",
    "secagg:collect_masked_vectors",
    "secagg:unmask",
]


def test_secure_round_records_every_stage_on_both_sides(tiny_base_dir, tmp_path):
    driver, state, _, stores = run(tiny_base_dir, tmp_path, "timeline")
    train = [h for h in state.history if h["task"] == "train"]
    assert train
    for entry in train:
        assert [s["stage"] for s in entry["timeline"]] == SECAGG_STAGES
        for stage in entry["timeline"]:
            assert len(stage["nodes"]) == 3  # every node's reply time
            assert 0 <= stage["first_reply"] <= stage["median_reply"] <= stage["seconds"]
        assert entry["server_seconds"] >= 0
        assert sum(s["seconds"] for s in entry["timeline"]) <= entry["seconds"]
    for cfg in stores.values():
        lines = read_timeline(cfg["store"])
        first = [line for line in lines if line["group"] == str(train[0]["server_round"])]
        assert [line["stage"] for line in first] == SECAGG_STAGES
        masked = first[2]
        # The training exchange carries the round's own parts, which fit inside it.
        assert {"load", "train", "handler"} <= set(masked)
        assert masked["train"] > 0
        assert masked["load"] + masked["train"] <= masked["handler"] <= masked["seconds"]
    summary = round_timeline(driver.run.metrics_file, [Path(c["store"]) for c in stores.values()])
    reward = summary["reward"]
    assert reward["train"] > 0
    assert reward["round"] == pytest.approx(
        reward["train"] + reward["secagg"] + reward["waiting"], abs=0.05
    )


def test_breakdown_of_a_constructed_round():
    entry = {
        "seconds": 10.0,
        "server_seconds": 0.5,
        "secagg": {"shares": 3},
        "timeline": [
            {"stage": "secagg:setup", "seconds": 0.4},
            {"stage": "secagg:share_keys", "seconds": 0.6},
            {"stage": "secagg:collect_masked_vectors", "seconds": 7.0},
            {"stage": "secagg:unmask", "seconds": 1.5},
        ],
    }
    clients = [
        {"stage": "secagg:setup", "seconds": 0.1},
        {"stage": "secagg:setup", "seconds": 0.2},
        {"stage": "secagg:share_keys", "seconds": 0.3},
        {"stage": "secagg:collect_masked_vectors", "seconds": 6.0, "handler": 5.0, "train": 4.0},
        {"stage": "secagg:collect_masked_vectors", "seconds": 6.5, "handler": 5.5, "train": 4.5},
        {"stage": "secagg:unmask", "seconds": 0.4},
    ]
    parts = round_breakdown(entry, clients)
    # The slowest client's handler is training; its masking (6.5 - 5.5) is SecAgg+, with
    # the slowest setup (0.2), share_keys (0.3), unmask (0.4) and the server's 0.5.
    assert parts["train"] == 5.5
    assert parts["secagg"] == pytest.approx(0.2 + 0.3 + 1.0 + 0.4 + 0.5)
    assert parts["waiting"] == pytest.approx(10.0 - 5.5 - 2.4)
    assert parts["client train"] == 4.5
