"""A finished run, rewound to the start of its policy phase, for another policy method.

``--compare-objectives`` runs every policy method from the same reward model, on the
same stores and the same remaining budget. Rather than training the reward phase again
for each method (minutes each, and a different reward model each time), the runner
forks the run at the reward/policy boundary: the server's checkpoint written when the
reward phase ended (``policy-round-0000``) and each organization's store as it was
then. A store changes in the policy phase only by its privacy ledger (and the replay
guard's last served round, which only grows), so the fork's store is a copy whose
ledger loses the policy phase's entries. The fork continues the server-round counter,
so no round number is sent twice to the same store. The fresh policy adapter is not
copied (it is the reference, whatever its shape), so a fork may change the policy's
LoRA shape too. The KL controller's saved state is dropped as well, so the fork's
policy phase starts from its own configuration's beta (``policy.beta``, or
``policy.dpo-beta`` for DPO), not the source's.

Only the simulation forks: a deployment's ledger is never rewritten.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from common.policy_model import POLICY_ADAPTER
from server.checkpoints import STATE_FILE, RunDirectory

POLICY_START = "policy-round-0000"
"""The checkpoint the server writes when the reward phase has ended."""


def fork_policy_phase(source: Path, target: Path, stores: list[Path]) -> list[Path]:
    """Copy ``source`` at the start of its policy phase into ``target``; returns the
    copied stores (same names, under ``target / "stores"``)."""
    start = source / "checkpoints" / POLICY_START
    if not start.exists():
        raise FileNotFoundError(f"{source} has no {POLICY_START} checkpoint to fork from")
    shutil.rmtree(target, ignore_errors=True)
    (target / "checkpoints").mkdir(parents=True)
    for checkpoint in (source / "checkpoints").iterdir():
        if checkpoint.name.startswith("reward-round-") or checkpoint.name == POLICY_START:
            shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name)
    shutil.copy2(source / "SERVER_ROUND", target / "SERVER_ROUND")
    # Drop the fresh policy adapter: it is the reference whatever its shape, and the fork
    # may give the policy another one (targets, rank); the server builds it anew.
    shutil.rmtree(target / "checkpoints" / POLICY_START / POLICY_ADAPTER, ignore_errors=True)
    state_file = target / "checkpoints" / POLICY_START / STATE_FILE
    state = json.loads(state_file.read_text())
    state["kl_controller"] = {}
    state_file.write_text(json.dumps(state))
    (target / "LATEST").write_text(POLICY_START)
    copies = []
    for store in stores:
        copy = target / "stores" / store.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(store) as original, sqlite3.connect(copy) as forked:
            original.backup(forked)
            forked.execute("DELETE FROM privacy_ledger WHERE phase = 'policy'")
        copies.append(copy)
    RunDirectory(target)  # the fork's metrics are rewritten from its state on resume
    return copies
