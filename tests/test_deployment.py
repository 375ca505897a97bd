"""A real deployment on loopback, driven by the operator's ``fedrlhf`` commands.

One SuperLink with TLS and SuperNode authentication, three registered SuperNodes
(each with its own store), one SuperNode whose key was never registered, and reward
rounds with SecAgg+ and DP-SGD launched with ``flwr run``. Every process is started
here, bound to 127.0.0.1, and stopped by PID (with everything it started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from client.store import PreferenceStore
from common.config import RunConfig
from common.privacy import epsilon
from common.processes import descendants, free_port, stop_process_tree, wait_until_listening
from simulations.loopback_deployment import FEDRLHF, Fleet, fedrlhf
from simulations.runner import fill_stores
from simulations.world import World, WorldConfig

pytestmark = pytest.mark.slow

ORGS = 3
ROUNDS = 3
REFUSED = "Failed to activate SuperNode"  # Flower's exit code 305 message


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_tls_authenticated_federation_on_loopback(tiny_base_dir, tmp_path, capsys):
    shown: list[str] = []  # what the test proves, printed to the CI log at the end
    logs = tmp_path / "logs"
    logs.mkdir()
    certs, keys, operator_home = tmp_path / "certs", tmp_path / "keys", tmp_path / "operator"
    fedrlhf("create-ca", "--dir", str(certs), "--host", "127.0.0.1", "--host", "localhost")
    names = [f"org-{i}" for i in range(ORGS)] + ["rogue"]
    for name in names:
        fedrlhf("create-node-key", "--out", str(keys / name), "--name", name)
    world = World(
        replace(WorldConfig(), organizations=ORGS, comparisons_per_org=120, test_pairs_per_org=10)
    )
    stores = fill_stores(world, RunConfig(), tmp_path / "stores")

    fleet = Fleet(logs)
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        superlink = fleet.start(
            "superlink",
            [FEDRLHF, "superlink", "--certs", str(certs), "--state", str(tmp_path / "link")]
            + ["--host", "127.0.0.1", "--port", str(port)],
        )
        wait_until_listening(superlink, "127.0.0.1", port, logs / "superlink.log")
        assert f"running on https://{address}" in fleet.log_text("superlink")
        shown.append(f"TLS: the SuperLink serves https://{address} with the federation's cert")

        for i in range(ORGS):
            out = fedrlhf(
                "register-node", "--superlink", address, "--ca", str(certs / "ca.crt"),
                "--home", str(operator_home), "--key", str(keys / f"org-{i}.pub"),
                "--name", f"org-{i}",
            )  # fmt: skip
            assert json.loads(out.stdout)["success"], out.stdout

        for i, name in enumerate(names):
            store = stores[i] if i < ORGS else stores[0]  # the rogue would serve a copy
            fleet.start(
                name,
                [FEDRLHF, "supernode", "--superlink", address, "--ca", str(certs / "ca.crt")]
                + ["--key", str(keys / name), "--store", str(store)]
                + ["--port", str(free_port()), "--home", str(tmp_path / f"home-{name}")],
            )

        rogue = fleet.processes["rogue"]
        assert rogue.wait(timeout=120) != 0
        assert "Exit Code: 305" in fleet.log_text("rogue") and REFUSED in fleet.log_text("rogue")
        shown.append(
            f"node authentication: {ORGS} registered SuperNodes; the unregistered one was "
            f"refused ({REFUSED!r}, exit code 305)"
        )

        run_dir = tmp_path / "run"
        launch_argv = (
            [FEDRLHF, "launch", "--superlink", address, "--ca", str(certs / "ca.crt")]
            + ["--home", str(operator_home)]
            + [
                f"--set={key}={value}"
                for key, value in {
                    "model.base": json.dumps(str(tiny_base_dir)),
                    "run-dir": json.dumps(str(run_dir)),
                    "reward.rounds": ROUNDS,
                    "reward.batch-size": 32,
                    "reward.learning-rate": 0.2,  # the defaults' is sized for batches of 256
                    "policy.rounds": 1,
                    "policy.iterations": 1,
                    "policy.batch-size": 8,
                    "policy.measure-prompts": 8,
                    "policy.max-new-tokens": 12,
                    "federation.min-clients": ORGS,
                    "federation.node-wait-timeout": 120.0,
                }.items()
            ]
        )
        started = time.monotonic()
        first = fleet.start("launch-1", launch_argv)
        deadline = time.monotonic() + 600
        while not (run_dir / "LATEST").exists() or "0001" not in (run_dir / "LATEST").read_text():
            assert first.poll() is None, fleet.log_text("launch-1")[-4000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.5)
        serverapps = [p for p in descendants(superlink.pid) if "flwr-serverapp" in cmdline(p)]
        assert len(serverapps) == 1, [cmdline(p) for p in descendants(superlink.pid)]
        os.kill(serverapps[0], signal.SIGKILL)
        stop_process_tree(first)
        shown.append(f"resume: killed the ServerApp (PID {serverapps[0]}) after round 1")

        launch = subprocess.run(
            launch_argv, capture_output=True, text=True, timeout=900, check=False
        )
        (logs / "launch-2.log").write_text(launch.stdout + launch.stderr)
        assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
        assert "resuming from reward-round-0001" in launch.stdout + launch.stderr
        seconds = time.monotonic() - started
    finally:
        fleet.stop_all()

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The restarted ServerApp finished the run with the planned number of rounds.
    assert [(h["phase"], h["task"], h["round"]) for h in history] == [
        *(("reward", "train", r) for r in range(1, ROUNDS + 1)),
        ("reward", "evaluate", ROUNDS),
        ("policy", "train", 1),
        ("policy", "evaluate", 1),
    ]
    assert all(h["survivors"] == ORGS and h["secure_aggregation"] and h["dp"] for h in history)
    output = launch.stdout + launch.stderr
    assert "Secure aggregation completed" in output
    # Operator output: the ServerApp's and Flower's lines, not the HTTP client's requests.
    assert "HTTP Request" not in output
    shown.append(
        f"SecAgg+ and DP: {len(history)} rounds over {ORGS} nodes, {seconds:.0f} s in all "
        "(with the restart); "
        f"seconds per round {[round(h['seconds'], 1) for h in history]}"
    )
    for store_path in stores:
        with PreferenceStore(store_path) as store:
            spent = epsilon(store.privacy_events(), 1e-5)
            ledger = store.ledger()
        training = [e.status for e in ledger if (e.phase, e.mechanism) == ("reward", "training")]
        # Every round trained once; a round 2 the killed ServerApp had begun may have
        # trained too, and counts (its charge pending if the client was cut off).
        assert training.count("committed") >= ROUNDS and len(training) <= ROUNDS + 1
        # Then the statistics releases (the reward phase's final evaluation, the policy
        # round's and the policy evaluation's) and the policy round's training.
        assert [
            (e.phase, e.mechanism, e.status)
            for e in ledger
            if (e.phase, e.mechanism) != ("reward", "training")
        ] == [
            ("reward", "statistics", "committed"),
            ("policy", "training", "committed"),
            ("policy", "statistics", "committed"),
            ("policy", "statistics", "committed"),
        ]
        # privacy.secure-noise is on by default: every DP run drew from the CSPRNG.
        assert {e.randomness for e in ledger} == {"secure"}
        assert 0 < spent <= 8.0
    # Model loads: Flower 1.41 starts a fresh ClientApp process per message, so a node
    # loads the base once for each round message that reaches the round logic (the
    # three SecAgg+ key-exchange stages of a round load nothing), i.e. once per round.
    loads = [fleet.log_text(f"org-{i}").count("loaded base") for i in range(ORGS)]
    assert all(len(history) <= n <= len(history) + 1 for n in loads), (loads, len(history))
    shown.append(
        f"model loads per node: {loads} for {len(history)} rounds "
        "(one per round; a round the killed ServerApp had begun may add one)"
    )
    assert not [pid for pid in fleet.seen_pids if alive(pid)], "processes left running"
    shown.append(f"stopped {len(fleet.seen_pids)} processes by PID; none left running")
    with capsys.disabled():
        print("\n" + "\n".join(f"  [deployment] {line}" for line in shown))
