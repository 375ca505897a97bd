"""Every value a client sends, in every phase, is masked-and-noised-and-accounted or a
fixed constant.

A whole run (a reward round, its final evaluation, a PPO round, its final evaluation)
goes through the real ClientApp. Every reply is taken apart record by record: each key
must be a SecAgg+ protocol value, a constant, or an array whose statistics are the
output of the Gaussian release (recorded as it happens, and different from the exact
figures) and whose update came out of a DP-SGD run; and every such reply has its
charges, committed, in the client's ledger. A key nobody accounted for fails the test.
"""

from __future__ import annotations

from collections import Counter

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import client.privacy_charges as privacy_charges
from client.store import PreferenceStore
from common.config import RunConfig
from common.dp_randomness import DPOptimizerWithRandomness
from common.wire import CANDIDATE_STATS, POLICY_STATS, REWARD_STATS
from server.phase_driver import PhaseDriver
from tests.inprocess_grid import InProcessGrid
from tests.test_secure_rounds import make_stores, run_config

RUN = {
    "reward.rounds": 1,
    "policy.rounds": 1,
    "policy.objective": "ppo",
    "policy.iterations": 1,
    "policy.batch-size": 8,
    "policy.measure-prompts": 8,
    "policy.max-new-tokens": 8,
}

SECAGG_REPLY_KEYS = {  # what a client's reply to each stage holds
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},  # public keys
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},  # encrypted shares
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},  # the masked update + stats
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},  # key shares of the dropped/alive
}

CHARGES = {  # what each kind of reply must have been charged, by (phase, task)
    ("reward", "train"): {"training"},
    ("reward", "evaluate"): {"statistics"},
    ("policy", "train"): {"training"},  # the update only: the candidate is measured after
    ("policy", "measure"): {"statistics"},  # the aggregated candidate, for the trust region
    ("policy", "evaluate"): {"statistics"},
}


def assert_constant_fitres_records(content, others: set[str]) -> None:  # noqa: ANN001
    """The legacy FitRes records besides the arrays: a constant status, an empty
    metrics record, and num_examples always 1 (the data size does not travel)."""
    assert set(content.config_records) == {"fitres.metrics", "fitres.status", *others}
    assert dict(content.config_records["fitres.metrics"]) == {}
    assert dict(content.config_records["fitres.status"]) == {"code": 0, "message": "ok"}
    assert {k: dict(v) for k, v in content.metric_records.items()} == {
        "fitres.num_examples": {"num_examples": 1}
    }
    assert set(content.array_records) == {"fitres.parameters"}


@pytest.fixture
def recorded(monkeypatch):
    """Every statistics release (exact sums, layout, what was sent) and every DP-SGD
    noise draw made in this process."""
    releases, noise_draws = [], []

    def recording(original):
        def noised(sums, layout, noise_multiplier, randomness):
            out = original(sums, layout, noise_multiplier, randomness)
            releases.append((dict(sums), layout, out, noise_multiplier))
            return out

        return noised

    monkeypatch.setattr(privacy_charges, "noised", recording(privacy_charges.noised))
    original_add_noise = DPOptimizerWithRandomness.add_noise

    def add_noise(self):
        noise_draws.append(self.noise_multiplier)
        return original_add_noise(self)

    monkeypatch.setattr(DPOptimizerWithRandomness, "add_noise", add_noise)
    return releases, noise_draws


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_every_value_a_client_sends_is_noised_and_accounted_or_constant(
    tiny_base_dir, tmp_path, recorded, secure
):
    releases, noise_draws = recorded
    stores = make_stores(tmp_path / "stores")
    flat = run_config(
        tiny_base_dir,
        tmp_path / "run",
        **RUN,
        **{"federation.secure-aggregation": secure},
    )
    grid = InProcessGrid(stores, flat)
    state = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat)).run_all()
    rounds = {h["server_round"]: (h["phase"], h["task"], h["round"]) for h in state.history}
    rounds |= {
        h["measure_server_round"]: ("policy", "measure", h["round"])
        for h in state.history
        if "measure_server_round" in h
    }
    assert sorted(rounds.values()) == [
        ("policy", "evaluate", 1),
        ("policy", "measure", 1),
        ("policy", "train", 1),
        ("reward", "evaluate", 1),
        ("reward", "train", 1),
    ]

    # Every statistics release was noised: no field went out exact.
    assert releases and all(
        all(out[k] != sums[k] for k in sums) and sigma > 0 for sums, _, out, sigma in releases
    )
    sent_stats = [layout.encode(out) for _, layout, out, _ in releases]
    assert noise_draws and all(sigma > 0 for sigma in noise_draws)

    replies: dict[tuple[int, int], int] = {}  # (node, server round) -> data-carrying replies
    for node, message in grid.sent_by_clients:
        assert not message.has_error(), message.error
        server_round = int(message.metadata.group_id)
        content = message.content
        if secure:
            # SecAgg+ protocol values only: keys, encrypted shares, the masked vector;
            # Flower's mod leaves the legacy FitRes records beside the masked vector,
            # its arrays emptied.
            keys = set(content.config_records[RECORD_KEY_CONFIGS])
            assert keys in SECAGG_REPLY_KEYS.values(), keys
            if keys != SECAGG_REPLY_KEYS[Stage.COLLECT_MASKED_VECTORS]:
                assert set(content.config_records) == {RECORD_KEY_CONFIGS}
                assert not content.array_records and not content.metric_records
                continue
            assert_constant_fitres_records(content, {RECORD_KEY_CONFIGS})
            assert all(len(r) == 0 for r in content.array_records.values())
            replies[node, server_round] = replies.get((node, server_round), 0) + 1
            continue
        assert_constant_fitres_records(content, set())
        arrays = parameters_to_ndarrays(compat.recorddict_to_fitres(content, True).parameters)
        phase, task, _ = rounds[server_round]
        carries_stats = task != "train"
        if carries_stats:
            stats = arrays[-1]
            layout = {"reward": REWARD_STATS, "policy": POLICY_STATS}[phase]
            layout = CANDIDATE_STATS if task == "measure" else layout
            assert stats.shape == layout.spec.shape
            assert any(np.array_equal(stats, s) for s in sent_stats), (node, phase, task)
        if task in ("measure", "evaluate"):
            assert len(arrays) == 1  # statistics only
        replies[node, server_round] = replies.get((node, server_round), 0) + 1

    # One release for every reply that carries statistics: none went out un-noised.
    assert len(releases) == sum(rounds[r][1] != "train" for _, r in replies)

    # Each data-carrying reply has its charges committed; nothing else was charged.
    for node, cfg in stores.items():
        with PreferenceStore(cfg["store"]) as store:
            ledger = store.ledger()
        assert all(e.status == "committed" for e in ledger)
        charged = Counter((e.phase, e.round, e.mechanism) for e in ledger)
        expected = Counter(
            (rounds[r][0], rounds[r][2], mechanism)
            for (n, r) in replies
            if n == node
            for mechanism in CHARGES[rounds[r][:2]]
        )
        assert charged == expected, node
        assert len([r for n, r in replies if n == node]) == 5
