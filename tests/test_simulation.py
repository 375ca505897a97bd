"""The real thing, small: `flwr run` under Flower's simulation engine (Ray on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

import pytest
from peft import PeftModel

from client.store import PreferenceStore
from common.model import load_base
from common.privacy import epsilon
from simulations.flower_runtime import RAY_DIR_PREFIX
from simulations.pretrain import PretrainConfig
from simulations.runner import SimulationOptions, run_simulation
from simulations.world import WorldConfig
from tests.test_privacy import independent_rdp_epsilon

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_simulation_end_to_end_with_secagg_and_dp(tmp_path):
    options = SimulationOptions(
        out_dir=tmp_path / "run",
        world=replace(
            WorldConfig(), organizations=3, comparisons_per_org=120, test_pairs_per_org=40
        ),
        overrides={"reward.rounds": 2, "reward.batch-size": 32},
        cache_dir=tmp_path / "cache",
        pretrain=PretrainConfig(corpus_size=1000, steps=30),
        baselines=False,
        timeout=900,
    )
    report = run_simulation(options)
    run_dir = tmp_path / "run"

    # Two training rounds and the final evaluation, all three clients every time.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(h["task"], h["round"]) for h in history] == [
        ("train", 1),
        ("train", 2),
        ("evaluate", 2),
    ]
    assert all(h["survivors"] == 3 and h["secure_aggregation"] and h["dp"] for h in history)
    assert history[-1]["fed_eval_pairs"] > 0

    # Privacy: every client's ledger composes to at most the budget, and it was used.
    for i in range(3):
        with PreferenceStore(run_dir / "stores" / f"org-{i}.sqlite") as store:
            spent = epsilon(store.privacy_events(), 1e-5)
            assert 1.0 < spent <= 8.0 and all(e.status == "committed" for e in store.ledger())
            # The ledger's epsilon agrees with Google's accountant on the same steps.
            assert spent == pytest.approx(
                independent_rdp_epsilon(store.privacy_events(), 1e-5), rel=0.02
            )
    assert report["epsilon_per_client"] == pytest.approx(
        [report["epsilon_per_client"][0]] * 3, rel=0.2
    )

    # The final adapter loads with PEFT on the base the run used.
    base_dir = json.loads((run_dir / "run_config.json").read_text())["model.base"]
    adapter = run_dir / "checkpoints" / "reward-round-0002" / "reward"
    base, _ = load_base(base_dir)
    assert isinstance(PeftModel.from_pretrained(base, str(adapter)), PeftModel)

    for name in (
        "report.json",
        "rounds.csv",
        "reward_accuracy.png",
        "epsilon_per_client.png",
        "bytes_per_round.png",
    ):
        assert (run_dir / name).stat().st_size > 0, name

    # Everything the run started is gone: SuperLink, SuperExec, Ray.
    leftovers = _processes_mentioning(str(run_dir / "flower-home")) + _processes_mentioning(
        RAY_DIR_PREFIX
    )
    assert not leftovers, leftovers
    assert os.environ.get("FLWR_HOME") is None or str(run_dir) not in os.environ["FLWR_HOME"]
