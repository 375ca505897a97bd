import dp_accounting
import pytest

from common.privacy import (
    RDP_ORDERS,
    BudgetExceeded,
    DPEvent,
    calibrate_noise_multiplier,
    check_budget,
    epsilon,
    merge_events,
    planned_steps,
)

DELTA = 1e-5


def independent_epsilon(events: list[DPEvent], delta: float, kind: str = "rdp") -> float:
    """Google's dp-accounting, composing the Poisson-subsampled Gaussian step by step:
    Renyi DP (``rdp``) or privacy-loss distributions (``pld``, an estimate)."""
    if kind == "rdp":
        accountant = dp_accounting.rdp.RdpAccountant()
    else:
        accountant = dp_accounting.pld.PLDAccountant()
    for e in events:
        event = dp_accounting.PoissonSampledDpEvent(
            e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
        )
        accountant.compose(event, e.steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "events",
    [
        [DPEvent(1.0, 0.01, 1000)],
        [DPEvent(0.8, 0.1, 300)],
        [DPEvent(1.1, 0.05, 20)] * 12,  # twelve rounds of one client
        [
            DPEvent(1.1, 0.05, 20),
            DPEvent(0.9, 0.08, 13),
            DPEvent(2.0, 0.2, 5),
        ],  # mixed phases/rounds
    ],
)
def test_epsilon_matches_an_independent_accountant(events):
    ours = epsilon(events, DELTA, "rdp")
    theirs = independent_epsilon(events, DELTA)
    assert ours == pytest.approx(theirs, rel=0.02)


def test_merging_identical_runs_changes_nothing():
    events = [DPEvent(1.0, 0.05, 10)] * 5 + [DPEvent(2.0, 0.05, 3)]
    assert merge_events(events) == [DPEvent(1.0, 0.05, 50), DPEvent(2.0, 0.05, 3)]
    assert epsilon(events, DELTA) == pytest.approx(epsilon(merge_events(events), DELTA))


def test_planned_steps_use_opacus_sample_rate():
    assert planned_steps(1000, 64, 1.0) == (1 / 16, 16)
    assert planned_steps(1000, 64, 0.5) == (1 / 16, 8)
    assert planned_steps(10, 64, 2.0) == (1.0, 2)


def test_calibration_spends_exactly_the_budget_over_the_plan():
    plan = [(0.05, 20)] * 10
    sigma = calibrate_noise_multiplier([], plan, budget=8.0, delta=DELTA)
    spent = epsilon([DPEvent(sigma, q, s) for q, s in plan], DELTA)
    assert 7.9 < spent <= 8.0
    # Half-way through, the same multiplier still fits and is kept.
    half = [DPEvent(sigma, q, s) for q, s in plan[:5]]
    assert calibrate_noise_multiplier(half, plan[5:], 8.0, DELTA, previous=sigma) == sigma


def test_budget_refusal():
    spent = [DPEvent(0.5, 0.1, 400)]
    assert epsilon(spent, DELTA) > 8
    with pytest.raises(BudgetExceeded, match="already spent"):
        calibrate_noise_multiplier(spent, [(0.1, 10)], 8.0, DELTA)
    with pytest.raises(BudgetExceeded, match="above the budget of 8.0"):
        check_budget([DPEvent(1.0, 0.1, 100)], [DPEvent(0.7, 0.1, 200)], 8.0, DELTA)
    assert check_budget([], [DPEvent(1.0, 0.1, 10)], 8.0, DELTA) < 8.0


def test_cached_rdp_epsilon_equals_opacus_accountant():
    """The per-step RDP cache must not change a single figure Opacus would give."""
    from opacus.accountants import RDPAccountant

    events = [DPEvent(1.1, 0.05, 30), DPEvent(0.8, 0.2, 7), DPEvent(1.1, 0.05, 30)]
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    assert epsilon(events, DELTA) == pytest.approx(
        accountant.get_epsilon(DELTA, alphas=RDP_ORDERS), rel=1e-12
    )


def test_a_small_epsilon_is_reachable_at_large_orders():
    """One Gaussian release at sigma 100: Opacus's orders stop at 63 and cannot go
    below epsilon 0.19; with dp-accounting's large orders it is about 0.05."""
    event = [DPEvent(100.0, 1.0, 1)]
    assert epsilon(event, DELTA) == pytest.approx(independent_epsilon(event, DELTA), rel=1e-3)
    assert epsilon(event, DELTA) < 0.06


@pytest.mark.parametrize("budget", [0.5, 3.0, 8.0])
def test_calibration_returns_the_smallest_noise_that_fits(budget):
    plan = [(0.02, 40), (0.1, 8)]

    def total(sigma):
        return epsilon([DPEvent(sigma, q, s) for q, s in plan], DELTA)

    sigma = calibrate_noise_multiplier([], plan, budget=budget, delta=DELTA, tolerance=1e-3)
    assert total(sigma) <= budget
    assert total(sigma * (1 - 2e-3)) > budget  # a hair less noise would overspend
