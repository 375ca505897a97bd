"""A full reward round with SecAgg+ vs the same round without it, side by side.

    python benchmarks/secagg_round.py [--orgs 5] [--rounds 4] [--pairs 2]

Runs the real ServerApp and ClientApp under Flower's simulation engine on the default
simulation's world and sizes (local DP training included), alternating secure and
plain runs, and compares the median seconds per training round (the first round,
which loads the models, is left out). Also prints the bytes per client per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from common.config import RunConfig
from simulations.pretrain import pretrained_base
from simulations.runner import clear_run, federate, fill_stores
from simulations.world import World, WorldConfig


def round_stats(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "train" and r["round"] > 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orgs", type=int, default=WorldConfig().organizations)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2, help="secure/plain run pairs, alternating")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "fedrlhf"))
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    world = World(replace(WorldConfig(), organizations=args.orgs))
    base = pretrained_base(world, Path(args.cache))
    seconds: dict[bool, list[float]] = {True: [], False: []}
    traffic: dict[bool, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="fedrlhf-bench-") as tmp_dir:
        tmp = args.work_dir or tmp_dir
        for _ in range(args.pairs):
            for secure in (True, False):
                run_dir = Path(tmp) / ("secure" if secure else "plain")
                overrides = {
                    "run-dir": str(run_dir),
                    "model.base": str(base),
                    "client.store": str(run_dir / "stores" / "org-{partition-id}.sqlite"),
                    "reward.rounds": args.rounds,
                    "federation.min-clients": args.orgs,
                    "federation.secure-aggregation": secure,
                }
                config = RunConfig().replace(**overrides)
                clear_run(run_dir)
                fill_stores(world, config, run_dir / "stores")
                federate(config, overrides, run_dir, args.orgs, timeout=1800)
                stats = round_stats(run_dir)
                seconds[secure] += [r["seconds"] for r in stats]
                traffic[secure] = (
                    stats[-1]["bytes_down_per_client"],
                    stats[-1]["bytes_up_per_client"],
                )
                adapter, full = stats[-1]["adapter_bytes"], stats[-1]["full_model_bytes"]
    s, p = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(
        f"{args.orgs} clients, {args.rounds} reward rounds per run, {args.pairs} run pairs; DP on, local training included"
    )
    print(
        f"plain round  : median {p:.2f} s over {len(seconds[False])} rounds; {traffic[False][0]:,} B down, {traffic[False][1]:,} B up per client"
    )
    print(
        f"SecAgg+ round: median {s:.2f} s over {len(seconds[True])} rounds; {traffic[True][0]:,} B down, {traffic[True][1]:,} B up per client"
    )
    print(f"SecAgg+ / plain round time ratio: {s / p:.3f}  (target <= 1.5)")
    print(f"adapter + head {adapter:,} B vs whole model {full:,} B: {full / adapter:.0f}x smaller")


if __name__ == "__main__":
    main()
