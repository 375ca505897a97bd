"""The labeling queue: pair order, double labels, agreement, refusals, export and stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.label_queue import (
    LabelError,
    QueueSettings,
    agreement,
    next_pair,
    progress,
    record_label,
    refresh_queue,
    undo_last,
)
from client.pair_selection import RANDOM, UNCERTAIN, order_pairs
from client.store import PreferenceStore
from fedrlhf.cli import main as cli


def test_uncertain_pairs_come_by_margin_with_random_ones_spread_evenly():
    margins = np.linspace(-3, 3, 101)
    queue = order_pairs(margins, 0.2, 0.1, np.random.default_rng(0))
    assert sorted(q.index for q in queue) == list(range(101))
    uncertain = [abs(margins[q.index]) for q in queue if q.selection == UNCERTAIN]
    assert uncertain == sorted(uncertain) and uncertain[0] == 0.0
    for k in range(1, 102):  # every prefix holds about a fifth random pairs
        assert abs(sum(q.selection == RANDOM for q in queue[:k]) - 0.2 * k) <= 1
    assert sum(q.labels_wanted == 2 for q in queue) == 10


def length_scorer(prompts, first, second):
    """A reward that is just length: a stand-in model with known margins."""
    return np.array([len(a) - len(b) for a, b in zip(first, second, strict=True)], float)


@pytest.fixture
def store(tmp_path):
    with PreferenceStore(tmp_path / "org.sqlite") as s:
        s.add_candidates("p1", ["aaaa", "aaab", "a much longer response"])
        s.add_candidates("p2", ["short", "shorter!", "x"])
        yield s


def test_refresh_ranks_by_reward_uncertainty_and_keeps_labeled_pairs(store):
    refresh_queue(store, length_scorer, QueueSettings(random_fraction=0.0, double_fraction=0.0))
    first = next_pair(store, "alice")
    assert {first.first, first.second} == {"aaaa", "aaab"}  # margin 0: least certain
    record_label(store, "alice", first.pair_id, first.first_id, "left")
    refresh_queue(store, None, QueueSettings(double_fraction=0.0))
    pairs = store.query("SELECT id, first_id, second_id FROM label_pairs")
    assert len(pairs) == 6 and first.pair_id in {p["id"] for p in pairs}
    assert progress(store, "alice").remaining == 5


def test_imported_comparisons_are_not_queued_again(store):
    from client.store import NewComparison

    store.add_comparisons([NewComparison("p1", "aaaa", "aaab", "imported")], source="import")
    assert refresh_queue(store, None) == 5


def test_double_labeled_pairs_measure_agreement(store):
    refresh_queue(store, None, QueueSettings(double_fraction=1.0))
    choices = {"alice": ["left", "left", "tie"], "bob": ["left", "right", "tie"]}
    for annotator, picks in choices.items():
        for pick in picks:
            pair = next_pair(store, annotator)
            # Both see pairs in the same rank order; "left" is the pair's first response.
            record_label(store, annotator, pair.pair_id, pair.first_id, pick)
    assert agreement(store) == {
        "double_labeled_pairs": 3,
        "label_pairs_compared": 3,
        "agreement": pytest.approx(2 / 3),
    }
    assert progress(store, "carol").remaining == 3  # three pairs still want their labels


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"pair_id": 999}, "field 'pair': no pair 999"),
        ({"shown_left_id": 999}, "field 'left': response 999 is not in pair"),
        ({"choice": "maybe"}, "field 'choice' must be one of"),
        ({"reason": "x" * 501}, "field 'reason' is over 500 characters"),
        ({"annotator": " "}, "sign in with a name first"),
    ],
)
def test_bad_choices_are_refused_naming_the_field_and_change_nothing(store, change, error):
    refresh_queue(store, None)
    pair = next_pair(store, "alice")
    before = store.snapshot()
    args = {
        "annotator": "alice",
        "pair_id": pair.pair_id,
        "shown_left_id": pair.first_id,
        "choice": "left",
        "reason": "",
    }
    with pytest.raises(LabelError, match=error):
        record_label(store, **{**args, **change})
    assert store.snapshot() == before


def test_one_label_per_annotator_and_pair_and_undo_removes_the_comparison(store):
    refresh_queue(store, None)
    pair = next_pair(store, "alice")
    record_label(store, "alice", pair.pair_id, pair.second_id, "left")
    with pytest.raises(LabelError, match="already labeled"):
        record_label(store, "alice", pair.pair_id, pair.second_id, "right")
    (comparison,) = store.comparisons()
    assert comparison.chosen == pair.second and comparison.source == "human"
    assert undo_last(store, "alice") == pair.pair_id
    assert store.comparisons() == [] and undo_last(store, "alice") is None


def test_export_round_trips_through_import_and_stats_report(store, tmp_path, capsys):
    refresh_queue(store, None)
    for _ in range(3):
        pair = next_pair(store, "alice")
        record_label(store, "alice", pair.pair_id, pair.first_id, "left")
    out = tmp_path / "export.jsonl"
    assert cli(["export", "--store", str(store.path), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "chosen", "rejected", "annotator"} <= set(lines[0])
    copy = tmp_path / "copy.sqlite"
    assert cli(["import", "--store", str(copy), str(out)]) == 0
    with PreferenceStore(copy) as imported:
        assert [(c.prompt, c.chosen, c.rejected, c.annotator) for c in imported.comparisons()] == [
            (c.prompt, c.chosen, c.rejected, c.annotator) for c in store.comparisons()
        ]
    capsys.readouterr()
    assert cli(["stats", "--store", str(store.path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["labels_per_annotator"] == {"alice": {"first": 3}}
    assert stats["epsilon_spent"] == 0.0
