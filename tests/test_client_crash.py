"""A client process killed (SIGKILL) in the middle of DP training, then restarted.

The store must come back intact: every comparison still there, the database
consistent, and the ledger still charging the killed round in full (its charge was
written before training began), so the restarted client cannot overspend.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from client.reward_round import cached_reward_model, reward_round, reward_spec
from client.store import NewComparison, PreferenceStore
from common.config import RunConfig
from common.privacy import epsilon
from common.protocol import RoundInstruction
from common.wire import to_ndarrays

CHILD = textwrap.dedent(
    """
    import sys
    from client.reward_round import cached_reward_model, reward_round, reward_spec
    from client.store import PreferenceStore
    from common.config import RunConfig
    from common.protocol import RoundInstruction
    from common.wire import to_ndarrays

    config = RunConfig.from_flower(eval(sys.argv[2]))
    model, _ = cached_reward_model(config.model)
    arrays = to_ndarrays(model.trainable_state(), reward_spec(model))
    instruction = RoundInstruction("reward", "train", 1, 2, 1, 1, "crash-test", 0)
    with PreferenceStore(sys.argv[1]) as store:
        store.claim_round("crash-test", 1, "child")
        reward_round(config, store, instruction, arrays, "run", "child")
    print("finished")
    """
)


def test_client_killed_mid_training_restarts_with_store_and_ledger_intact(tiny_base_dir, tmp_path):
    store_file = tmp_path / "org.sqlite"
    with PreferenceStore(store_file) as store:
        store.add_comparisons(
            [
                NewComparison(f"question {k}?", f"a fine answer {k}", f"a poor reply {k}", "ann")
                for k in range(60)
            ],
            source="human",
        )
        before = store.snapshot()
    # Many local epochs: training lasts long enough to be killed in the middle of it.
    config = RunConfig().replace(
        **{"model.base": str(tiny_base_dir), "reward.batch-size": 4, "reward.local-epochs": 400.0}
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_file), repr(config.to_flower())],
        cwd=os.getcwd(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the charge is written, i.e. training has begun
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            with PreferenceStore(store_file) as store:
                if store.ledger():
                    break
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # The restarted client finds everything it had, and the killed round still counted.
    conn = sqlite3.connect(store_file)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with PreferenceStore(store_file) as store:
        after = store.snapshot()
        for table in ("prompts", "responses", "comparisons"):
            assert after[table] == before[table]
        ledger = store.ledger()
        assert [e.status for e in ledger] == ["pending"]
        killed_round = epsilon(store.privacy_events(), 1e-5)
        assert killed_round > 0

        # It serves the next round normally, and its budget counts both rounds.
        config = config.replace(**{"reward.local-epochs": 1.0, "reward.batch-size": 32})
        model, _ = cached_reward_model(config.model)
        arrays = to_ndarrays(model.trainable_state(), reward_spec(model))
        store.claim_round("crash-test", 2, "restarted")
        instruction = RoundInstruction("reward", "train", 2, 2, 1, 2, "crash-test", 0)
        reward_round(config, store, instruction, arrays, "run", "restarted")
        assert [e.status for e in store.ledger()] == ["pending", "committed"]
        assert epsilon(store.privacy_events(), 1e-5) > killed_round
