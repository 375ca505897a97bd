"""The real thing, small: `flwr run` under Flower's simulation engine (Ray on loopback)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from itertools import pairwise

import pytest
from peft import PeftModel

from client.privacy_report import privacy_report
from client.store import PreferenceStore
from common.model import load_base
from common.privacy import epsilon
from simulations.flower_runtime import RAY_DIR_PREFIX
from simulations.pretrain import PretrainConfig, cache_key, train_base
from simulations.runner import SimulationOptions, run_simulation
from simulations.world import World, WorldConfig
from tests.test_privacy_report import assert_matches_independent_accountants

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(
        # -ww: full command lines (without a terminal ps cuts them at 80 columns).
        ["ps", "-eww", "-o", "pid,args"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if text in line and "ps -eww" not in line]


def test_simulation_end_to_end_with_secagg_and_dp(tmp_path):
    options = SimulationOptions(
        out_dir=tmp_path / "run",
        world=replace(
            WorldConfig(),
            organizations=3,
            comparisons_per_org=120,
            test_pairs_per_org=40,
            policy_prompts_per_org=40,
        ),
        overrides={
            "reward.rounds": 2,
            "reward.batch-size": 32,
            "reward.learning-rate": 0.2,  # the defaults' step is sized for batches of 256
            "policy.rounds": 2,
            "policy.iterations": 2,
            "policy.batch-size": 8,
            "policy.measure-prompts": 8,
            "policy.max-new-tokens": 12,
        },
        cache_dir=tmp_path / "cache",
        pretrain=PretrainConfig(corpus_size=1000, steps=30),
        baselines=False,
        timeout=900,
        frontier_samples=4,
    )
    report = run_simulation(options)
    run_dir = tmp_path / "run"

    # Two training rounds and the final evaluation per phase, all three clients every time.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(h["phase"], h["task"], h["round"]) for h in history] == [
        ("reward", "train", 1),
        ("reward", "train", 2),
        ("reward", "evaluate", 2),
        ("policy", "train", 1),
        ("policy", "train", 2),
        ("policy", "evaluate", 2),
    ]
    assert all(h["survivors"] == 3 and h["secure_aggregation"] and h["dp"] for h in history)
    # Only the final evaluation releases held-out figures (noised: a rough number here).
    assert [h["fed_eval_accuracy"] is not None for h in history[:3]] == [False, False, True]

    # The policy section: the reference (round 0) and each round judged by the truth.
    policy = report["policy"]
    assert [r["round"] for r in policy["rounds"]] == [0, 1, 2]
    assert policy["rounds"][0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    # k1 is unbiased but a sample of it may be negative for a policy this close to the
    # reference; that the policy moved at all shows as a nonzero estimate.
    assert policy["rounds"][-1]["kl_to_reference"] != 0.0
    assert all(r["true_utility_sd"] > 0 for r in policy["rounds"])
    assert set(policy["checks"]) >= {"final policy's true utility above the reference's"}
    # The world's KL-optimal frontier, estimated from the reference's samples.
    frontier = policy["kl_optimal_frontier"]
    assert frontier[0] == {"kl": 0.0, "gain": 0.0, "gain_in_sd": 0.0}
    assert all(a["kl"] < b["kl"] and a["gain"] < b["gain"] for a, b in pairwise(frontier))
    assert frontier[-1]["kl"] <= math.log(4) + 1e-9

    # Privacy: every client's ledger composes to at most the budget, and it was used;
    # training and the statistics releases of both phases are all in it.
    for i in range(3):
        with PreferenceStore(run_dir / "stores" / f"org-{i}.sqlite") as store:
            ledger = store.ledger()
            spent = epsilon(store.privacy_events(), 1e-5)
            report_ = privacy_report(store, 1e-5)
        assert 1.0 < spent <= 8.0 and all(e.status == "committed" for e in ledger)
        assert {(e.phase, e.mechanism) for e in ledger} == {
            (phase, mechanism)
            for phase in ("reward", "policy")
            for mechanism in ("training", "statistics")
        }
        # The ledger's epsilon agrees with Google's accountants, per unit type and overall.
        assert_matches_independent_accountants(report_, ledger)
    assert report["epsilon_per_client"] == pytest.approx(
        [report["epsilon_per_client"][0]] * 3, rel=0.2
    )

    # The final adapters load with PEFT on the base the run used.
    base_dir = json.loads((run_dir / "run_config.json").read_text())["model.base"]
    for adapter in ("reward-round-0002/reward", "policy-round-0002/policy"):
        base, _ = load_base(base_dir)
        path = run_dir / "checkpoints" / adapter
        assert isinstance(PeftModel.from_pretrained(base, str(path)), PeftModel)

    for name in (
        "report.json",
        "rounds.csv",
        "reward_accuracy.png",
        "epsilon_per_client.png",
        "bytes_per_round.png",
        "policy_rounds.png",
        "policy_utility_vs_kl.png",
    ):
        assert (run_dir / name).stat().st_size > 0, name

    # Everything the run started is gone: SuperLink, SuperExec, Ray.
    leftovers = _processes_mentioning(str(run_dir / "flower-home")) + _processes_mentioning(
        RAY_DIR_PREFIX
    )
    assert not leftovers, leftovers
    assert os.environ.get("FLWR_HOME") is None or str(run_dir) not in os.environ["FLWR_HOME"]


def test_killed_simulate_command_stops_every_server_it_started(tmp_path):
    """`kill <pid>` of `fedrlhf simulate` mid-run: SuperLink, SuperExec and Ray go too."""
    world = World(WorldConfig())
    # A quickly trained base under the default cache key, so the command skips pretraining.
    cached = tmp_path / "cache" / cache_key(world, PretrainConfig())
    train_base(world, PretrainConfig(corpus_size=500, steps=30), cached)
    run_dir = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "fedrlhf.cli", "simulate", "--no-baselines", "--orgs", "2"),
        *("--comparisons", "60", "--cache", str(tmp_path / "cache"), "--out", str(run_dir)),
        *("--set", "reward.rounds=50", "--set", "policy.rounds=0"),
        *("--set", "reward.batch-size=16", "--set", "federation.min-clients=2"),
        *("--set", "reward.learning-rate=0.2", "--set", "reward.local-epochs=1.0"),
    ]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        # Wait until the federation runs: a round's checkpoint exists.
        while not list((run_dir / "checkpoints").glob("reward-round-0001")):
            assert process.poll() is None, stderr.read_text()[-2000:]
            assert time.monotonic() < deadline, "no reward round within 300 s"
            time.sleep(1.0)
        assert _processes_mentioning(str(run_dir / "flower-home"))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    time.sleep(1.0)
    leftovers = _processes_mentioning(str(run_dir / "flower-home")) + _processes_mentioning(
        RAY_DIR_PREFIX
    )
    assert not leftovers, leftovers


def test_simulation_on_a_researchers_data_set_with_a_partitioner(tiny_base_dir, tmp_path):
    """`simulate --data FILE --partition dirichlet:... --partition-by topic`, DP + SecAgg+."""
    from simulations.english_preferences import EnglishPreferences, EnglishPreferencesConfig
    from simulations.user_data import DataOptions

    data = EnglishPreferences(EnglishPreferencesConfig(comparisons_per_org=50))
    rows = [r for org in range(3) for r in data.organization_rows(org)]
    pooled = tmp_path / "pooled.jsonl"
    pooled.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    run_dir = tmp_path / "run"
    options = SimulationOptions(
        out_dir=run_dir,
        data=DataOptions(
            files=(pooled,),
            partition="dirichlet:1.0",
            partition_by="topic",
            organizations=3,
            test_fraction=0.2,
        ),
        overrides={
            "model.base": str(tiny_base_dir),
            "reward.rounds": 2,
            "reward.batch-size": 16,
            "reward.learning-rate": 0.2,  # the defaults' step is sized for batches of 256
            "policy.rounds": 1,
            "policy.iterations": 1,
            "policy.batch-size": 8,
            "policy.measure-prompts": 8,
        },
        timeout=900,
    )
    report = run_simulation(options)

    assert report["data"]["organizations"] == ["org-0", "org-1", "org-2"]
    assert report["data"]["test_comparisons"] == 30
    for key in (
        "centralized_non_dp_accuracy",
        "centralized_dp_accuracy",
        "federated_final_accuracy",
    ):
        assert 0.0 <= report[key] <= 1.0, key
    assert len(report["single_org_accuracies"]) == 3
    assert report["bayes_ceiling"] is None  # real data: no hidden truth
    assert "federation" in report["summary"] and "DP" in report["summary"]
    assert report["policy"]["rounds"][-1]["round"] == 1
    # Each organization's share went through the partner's importer into its store.
    counts = []
    for i in range(3):
        with PreferenceStore(run_dir / "stores" / f"org-{i}.sqlite") as store:
            counts.append(store.counts()["comparisons"])
    assert sum(counts) == 120 and min(counts) > 0

    # The operator's log: the ServerApp's round lines once each, no HTTP request lines.
    log = (run_dir / "flower.log").read_text()
    assert "HTTP Request" not in log
    assert log.count("reward round 1/2 train") == 1, log[-3000:]
