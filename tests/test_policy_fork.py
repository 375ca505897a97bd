"""A finished run forked at the end of its reward phase runs another policy phase."""

from __future__ import annotations

import torch

from client.store import PreferenceStore
from common.config import RunConfig
from server.checkpoints import RunDirectory
from server.phase_driver import PhaseDriver
from simulations.policy_fork import POLICY_START, fork_policy_phase
from tests.inprocess_grid import InProcessGrid
from tests.test_policy_rounds import POLICY, run_policy
from tests.test_secure_rounds import run_config


def ledger(path) -> list[tuple]:  # noqa: ANN001
    with PreferenceStore(path) as store:
        return [(e.phase, e.round, e.mechanism, e.event) for e in store.ledger()]


def test_a_fork_reruns_the_policy_phase_from_the_same_reward_model(tiny_base_dir, tmp_path):
    source, _, _, stores = run_policy(tiny_base_dir, tmp_path, "source", **{"policy.rounds": 1})
    source_dir = RunDirectory(source.config.run_dir).path
    paths = [tmp_path / "stores" / f"org-{c['partition-id']}.sqlite" for c in stores.values()]
    before = {p: ledger(p) for p in paths}
    fork_dir = tmp_path / "fork"
    copies = fork_policy_phase(source_dir, fork_dir, paths)

    for original, copy in zip(paths, copies, strict=True):
        assert ledger(original) == before[original]  # the source is untouched
        assert ledger(copy) == [e for e in before[original] if e[0] == "reward"]
    assert (fork_dir / "LATEST").read_text() == POLICY_START
    assert not (fork_dir / "checkpoints" / POLICY_START / "policy").exists()

    # Another policy shape and beta: the fork builds its own fresh adapter and controller.
    assert source.kl_controller.beta != 0.7
    flat = run_config(
        tiny_base_dir,
        fork_dir,
        **{**POLICY, "policy.rounds": 1, "policy.lora-targets": "q_proj", "policy.beta": 0.7},
    )
    node_configs = {
        node: {**cfg, "store": str(copy)}
        for (node, cfg), copy in zip(stores.items(), copies, strict=True)
    }
    grid = InProcessGrid(node_configs, flat)
    state = PhaseDriver(grid, grid.server_context, RunConfig.from_flower(flat)).run_all()

    assert state.finished
    first = next(h for h in state.history if h["phase"] == "policy" and h["task"] == "train")
    assert first["beta"] == 0.7
    run, origin = RunDirectory(fork_dir), RunDirectory(source_dir)
    final = run.load(run.latest())
    reward_then = origin.load(origin.checkpoints / POLICY_START).reward
    assert all(torch.equal(final.reward[n], reward_then[n]) for n in reward_then)
    assert final.policy and all("q_proj" in n for n in final.policy if ".lora_" in n)
    for original, copy in zip(paths, copies, strict=True):
        forked = ledger(copy)
        assert [e for e in forked if e[0] == "reward"] == [
            e for e in ledger(original) if e[0] == "reward"
        ]
        assert any(e[0] == "policy" and e[2] == "training" for e in forked)
