"""A deployment reward round against the same clients' local training alone.

    python benchmarks/deployment_round.py [--orgs 3] [--comparisons 600] [--rounds 5]

Side by side on this machine, on copies of the same stores:

* **local alone**: each organization's reward round (evaluate, plan the noise, DP-SGD,
  pack the update) run directly, the organizations in parallel processes that keep
  their model loaded, no Flower;
* **deployment**: the same rounds through a real TLS federation on 127.0.0.1
  (SuperLink, one authenticated SuperNode per store, SecAgg+, ``fedrlhf launch``).

Prints the median seconds per round after the first (which loads the models), the
overhead (deployment minus local), and the deployment round split into the clients'
local work, SecAgg+ and waiting (``simulations.round_timeline``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common.config import RunConfig
from common.english_base import default_cache_dir
from common.protocol import RoundInstruction
from simulations.loopback_deployment import LoopbackDeployment
from simulations.pretrain import pretrained_base
from simulations.round_timeline import client_rounds, round_breakdown
from simulations.runner import fill_stores
from simulations.world import World, WorldConfig


def _local_round(task: tuple[str, dict, int, int]) -> float:
    """One organization's reward round, in a pool worker that keeps its model loaded."""
    from client.reward_round import cached_reward_model, reward_round, reward_spec
    from client.store import PreferenceStore
    from common.wire import to_ndarrays

    store_path, flat, round_, rounds = task
    config = RunConfig.from_flower(flat)
    start = time.perf_counter()
    model, _ = cached_reward_model(config.model)
    arrays = to_ndarrays(model.trainable_state(), reward_spec(model))
    instruction = RoundInstruction("reward", "train", round_, rounds, 1, round_, "local", 0)
    with PreferenceStore(store_path) as store:
        reward_round(config, store, instruction, arrays, "local", f"{store_path} round {round_}")
    return time.perf_counter() - start


def local_alone(stores: list[Path], config: RunConfig, rounds: int) -> list[float]:
    """Wall seconds per round with every organization training at once, no Flower."""
    flat = config.to_flower()
    with multiprocessing.get_context("spawn").Pool(len(stores)) as pool:
        seconds = []
        for round_ in range(1, rounds + 1):
            start = time.perf_counter()
            pool.map(_local_round, [(str(s), flat, round_, rounds) for s in stores])
            seconds.append(time.perf_counter() - start)
    return seconds


def deployment(work: Path, stores: list[Path], settings: dict, timeout: float) -> list[dict]:
    """The rounds through a TLS federation on loopback; their metrics lines."""
    with LoopbackDeployment(work, stores) as federation:
        launch = federation.fleet.start("launch", federation.launch_argv(settings))
        launch.wait(timeout=timeout)
        if launch.returncode != 0:
            raise RuntimeError(federation.fleet.log_text("launch")[-3000:])
    lines = (Path(settings["run-dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orgs", type=int, default=3)
    parser.add_argument("--comparisons", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    world = World(
        replace(WorldConfig(), organizations=args.orgs, comparisons_per_org=args.comparisons)
    )
    base = pretrained_base(World(WorldConfig()), args.cache)
    with tempfile.TemporaryDirectory(prefix="fedrlhf-deploy-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        run_dir = tmp / "run"
        settings = {
            "model.base": str(base),
            "run-dir": str(run_dir),
            "reward.rounds": args.rounds,
            "policy.rounds": 0,
            "federation.min-clients": args.orgs,
        }
        config = RunConfig().replace(**settings)
        stores = fill_stores(world, config, tmp / "stores")
        local_stores = []
        for path in stores:
            local_stores.append(tmp / "local" / path.name)
            local_stores[-1].parent.mkdir(exist_ok=True)
            shutil.copy(path, local_stores[-1])

        local = local_alone(local_stores, config, args.rounds)
        history = deployment(tmp / "deployment", stores, settings, args.timeout)
        rounds = [h for h in history if h["task"] == "train"]
        clients = client_rounds(stores)
        parts = [round_breakdown(h, clients.get(str(h["server_round"]), [])) for h in rounds]

    def median(values: list[float]) -> float:
        return statistics.median(values[1:] or values)

    local_s, deploy_s = median(local), median([h["seconds"] for h in rounds])
    print(
        f"{args.orgs} organizations x {args.comparisons} comparisons, {args.rounds} reward "
        f"rounds, DP-SGD + SecAgg+ over TLS on 127.0.0.1 ({multiprocessing.cpu_count()} cores)"
    )
    print(
        f"local training alone : median {local_s:6.2f} s per round  {[round(s, 1) for s in local]}"
    )
    print(
        f"deployment round     : median {deploy_s:6.2f} s per round  "
        f"{[round(h['seconds'], 1) for h in rounds]}"
    )
    print(f"overhead per round   : {deploy_s - local_s:+6.2f} s  (target <= 5 s)")
    for key in ("train", "secagg", "waiting"):
        print(f"  deployment {key:8s}: median {median([p[key] for p in parts]):6.2f} s")
    stages = {s["stage"] for h in rounds for s in h["timeline"]}
    for stage in sorted(stages):
        values = [s["seconds"] for h in rounds for s in h["timeline"] if s["stage"] == stage]
        print(f"  stage {stage:34s}: median {median(values):6.2f} s")
    client_parts = sorted({k for p in parts for k in p if k.startswith("client ")})
    for key in client_parts:
        print(f"  slowest {key:26s}: median {median([p.get(key, 0.0) for p in parts]):6.2f} s")


if __name__ == "__main__":
    main()
