"""The KL-optimal frontier: the reference tilted by exp(utility / t), by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.kl_frontier import tilted_frontier


def test_two_responses_per_prompt_by_hand():
    # Responses of utility 0 and 1, equally likely under the reference. Tilted at t,
    # the good one has w = e^(1/t) / (1 + e^(1/t)): gain w - 1/2, KL w log 2w + (1-w) log 2(1-w).
    frontier = tilted_frontier(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert frontier.kl[0] == 0 and frontier.gain[0] == 0
    assert (np.diff(frontier.kl) > 0).all() and (np.diff(frontier.gain) > 0).all()
    w = 0.8
    kl = w * math.log(2 * w) + (1 - w) * math.log(2 * (1 - w))
    assert frontier.gain_at(kl) == pytest.approx(w - 0.5, abs=2e-3)
    # At most the best response, at most log 2 nats away.
    assert frontier.gain[-1] == pytest.approx(0.5, abs=1e-3)
    assert frontier.kl[-1] == pytest.approx(math.log(2), abs=1e-3)
    assert frontier.gain_at(10.0) == frontier.gain[-1]


def test_the_tilt_beats_any_other_reweighting_at_the_same_kl():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(50, 16))
    frontier = tilted_frontier(u)
    for _ in range(20):  # random reweightings of the same samples
        w = rng.dirichlet(np.full(16, 2.0), size=50)
        kl = (w * np.log(w * 16)).sum(axis=1).mean()
        gain = ((w * u).sum(axis=1) - u.mean(axis=1)).mean()
        if kl < frontier.kl[-1]:
            assert gain <= frontier.gain_at(kl) + 1e-9


def test_tilting_by_another_score_buys_less_truth_at_the_same_kl():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(40, 16))
    noisy = u + rng.normal(scale=1.0, size=u.shape)  # a reward model that is half right
    truth, by_model = tilted_frontier(u), tilted_frontier(u, tilt_by=noisy)
    assert by_model.kl[0] == 0 and (np.diff(by_model.kl) > 0).all()
    for kl in (0.1, 0.3, 0.6):
        assert 0 < by_model.gain_at(kl) < truth.gain_at(kl)
    # Tilting by the truth itself is the frontier.
    same = tilted_frontier(u, tilt_by=u)
    assert same.gain_at(0.3) == pytest.approx(truth.gain_at(0.3), rel=1e-6)
