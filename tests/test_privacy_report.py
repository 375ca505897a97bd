import json

import pytest

from client.privacy_report import privacy_report
from client.store import PreferenceStore
from common.privacy import DPEvent
from fedrlhf.cli import main
from tests.test_privacy import independent_epsilon

DELTA = 1e-5

LEDGER = [  # (phase, round, event, mechanism, unit): a reward phase, then PPO rounds
    *[("reward", r, DPEvent(1.3, 0.12, 17), "training", "comparison") for r in (1, 2, 3)],
    ("reward", 3, DPEvent(10.3, 1.0, 1), "statistics", "comparison"),
    *[("policy", r, DPEvent(2.4, 0.128, 8), "training", "prompt") for r in (1, 2)],
    *[("policy", r, DPEvent(10.3, 0.128, 1), "statistics", "prompt") for r in (1, 2, 2)],
]


def assert_matches_independent_accountants(report: dict, ledger: list) -> None:
    """Each composition's RDP is within 1% of dp-accounting's RDP and its PRV bound
    within 1% (or 0.002 for small figures) of dp-accounting's PLD, per unit type and
    overall."""
    by_subset = {c["subset"]: c for c in report["compositions"]}
    for subset, entries in [
        ("all", ledger),
        ("unit=comparison", [e for e in ledger if e.unit == "comparison"]),
        ("unit=prompt", [e for e in ledger if e.unit == "prompt"]),
    ]:
        if not entries:
            continue
        events = [e.event for e in entries]
        figures = by_subset[subset]["epsilon"]
        assert figures["rdp"] == pytest.approx(independent_epsilon(events, DELTA), rel=0.01)
        # PRV's bound is within 0.1% of the larger of 1 and epsilon (absolute), and
        # dp-accounting's PLD estimate carries its own discretization error.
        pld = independent_epsilon(events, DELTA, "pld")
        slack = max(0.01 * pld, 2e-3)
        assert pld - slack <= figures["prv"] <= pld + slack, (subset, figures["prv"], pld)
        assert figures["prv"] < figures["rdp"]


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "org.sqlite"
    with PreferenceStore(path) as store:
        for phase, round_, event, mechanism, unit in LEDGER:
            entry = store.begin_charge("run-1", phase, round_, event, "secure", mechanism, unit)
            if mechanism == "training" or round_ == 1:
                store.commit_charge(entry, event.steps)
    return path


def test_report_lists_every_charge_and_matches_independent_accountants(store_path):
    with PreferenceStore(store_path) as store:
        report = privacy_report(store, DELTA)
        ledger = store.ledger()
    assert len(report["mechanisms"]) == len(LEDGER)
    assert report["pending_counted_in_full"] == 3
    first = report["mechanisms"][0]
    assert (first["phase"], first["mechanism"], first["unit"], first["steps"]) == (
        "reward",
        "training",
        "comparison",
        17,
    )
    subsets = {c["subset"]: c["mechanisms"] for c in report["compositions"]}
    assert subsets == {
        "all": 9,
        "phase=reward": 4,
        "phase=policy": 5,
        "mechanism=training": 5,
        "mechanism=statistics": 4,
        "unit=comparison": 4,
        "unit=prompt": 5,
    }
    assert_matches_independent_accountants(report, ledger)


def test_privacy_report_command_prints_tables_and_json(store_path, capsys):
    assert main(["privacy-report", "--store", str(store_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["delta"] == DELTA and len(report["mechanisms"]) == len(LEDGER)
    assert main(["privacy-report", "--store", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "epsilon (RDP)" in out and "epsilon (PRV)" in out and "unit=prompt" in out
