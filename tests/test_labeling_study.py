"""The simulated annotation campaigns run end to end on tiny settings."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from simulations.labeling_study import labels_to_reach, run_study, small_study
from simulations.pretrain import PretrainConfig
from simulations.world import WorldConfig


def test_labels_to_reach_interpolates_between_points():
    curve = [(100, 0.60), (200, 0.70), (300, 0.80)]
    assert labels_to_reach(curve, 0.75) == pytest.approx(250)
    assert labels_to_reach(curve, 0.55) == 100
    assert labels_to_reach(curve, 0.90) is None


@pytest.mark.slow
def test_study_writes_both_curves_and_the_saving(tmp_path):
    report = run_study(
        tmp_path / "study",
        small_study(),
        replace(WorldConfig(), organizations=2, test_pairs_per_org=40),
        cache_dir=tmp_path / "cache",
        pretrain=PretrainConfig(corpus_size=1000, steps=30),
    )
    study = small_study()
    assert set(report["curves_mean"]) == {
        "random",
        "uncertainty (20% random)",
        "uncertainty (50% random)",
    }
    for strategy in report["curves_mean"]:
        labels = [n for n, _ in report["curves_mean"][strategy]]
        assert labels == list(range(study.seed_labels, study.budget + 1, study.batch))
        assert all(0.0 <= acc <= 1.0 for _, acc in report["curves_mean"][strategy])
    savings = report["labels_needed_for_random_accuracy_at_n"]["uncertainty (20% random)"]
    assert [row["random_labels"] for row in savings] == [40, 60]
    saved = json.loads((tmp_path / "study" / "labeling_study.json").read_text())
    assert saved["labels_saved"] == report["labels_saved"]
    assert (tmp_path / "study" / "labeling_study.png").stat().st_size > 10_000
