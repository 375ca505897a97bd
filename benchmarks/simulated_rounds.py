"""Simulated reward rounds as the federation grows: 10, 30, 100 organizations.

    python benchmarks/simulated_rounds.py [--clients 10 30 100] [--comparisons 100]
        [--same-total 10000]

For each size, the real ServerApp and ClientApp under Flower's simulation engine
(DP-SGD + SecAgg+, every organization sampled), ``--rounds`` reward rounds on stores
of ``--comparisons`` comparisons. Prints, per size, the seconds of a round after the
first (which loads the models) split into the slowest client's local work, SecAgg+
and waiting; the SecAgg+ share graph; bytes per client each way against the adapter's;
and the peak memory of all the simulation's processes together. With ``--same-total``,
a second series splits that many comparisons over the same numbers of organizations
(more, smaller organizations at the same total data) and prints the federation's
held-out accuracy for each split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import psutil

from common.config import RunConfig
from common.english_base import default_cache_dir
from common.model import load_base
from server.checkpoints import RunDirectory
from simulations.baselines import build_test_set
from simulations.pretrain import pretrained_base
from simulations.report import round_accuracies
from simulations.round_timeline import client_rounds, round_breakdown
from simulations.runner import clear_run, federate, fill_stores
from simulations.world import World, WorldConfig


@contextmanager
def peak_tree_memory(peak: list[int]) -> Iterator[None]:
    """Sample the summed RSS of this process and all its descendants (Ray included)."""
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with suppress(psutil.Error):
                    total += process.memory_info().rss
            peak[0] = max(peak[0], total)
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


TEST_PAIRS = 4000
"""Held-out comparisons over all organizations, whatever their number."""


def run_size(clients: int, comparisons: int, rounds: int, base: Path, work: Path) -> dict:
    world = World(
        replace(
            WorldConfig(),
            organizations=clients,
            comparisons_per_org=comparisons,
            test_pairs_per_org=max(1, TEST_PAIRS // clients),
            policy_prompts_per_org=1,
        )
    )
    run_dir = work / f"clients-{clients}-x{comparisons}"
    overrides = {
        "run-dir": str(run_dir),
        "model.base": str(base),
        "client.store": str(run_dir / "stores" / "org-{partition-id}.sqlite"),
        "reward.rounds": rounds,
        "policy.rounds": 0,
        "federation.min-clients": clients,
    }
    config = RunConfig().replace(**overrides)
    stores = fill_stores(world, config, run_dir / "stores")
    clear_run(run_dir)
    peak = [0]
    with peak_tree_memory(peak):
        federate(config, overrides, run_dir, clients, timeout=3600)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = client_rounds(stores)
    train = [h for h in history if h["task"] == "train"]
    parts = [round_breakdown(h, lines.get(str(h["server_round"]), [])) for h in train]
    steady = parts[1:] or parts
    return {
        "clients": clients,
        "comparisons": comparisons,
        "first_round": parts[0]["round"],
        **{
            k: statistics.median(p[k] for p in steady)
            for k in ("round", "train", "secagg", "waiting")
        },
        "share_graph": train[-1]["secagg"],
        "down": max(h["bytes_down_per_client"] for h in train),
        "up": max(h["bytes_up_per_client"] for h in train),
        "adapter": train[-1]["adapter_bytes"],
        "accuracy": final_test_accuracy(config, world, run_dir),
        "peak_memory": peak[0],
    }


def final_test_accuracy(config: RunConfig, world: World, run_dir: Path) -> float:
    """The final reward model scored on the world's test pairs (the federation's own
    held-out figure is DP-noised, and too rough at 100 pairs a client)."""
    _, tokenizer = load_base(config.model.base)
    test = build_test_set(world, tokenizer, config.model.max_length)
    accuracies = round_accuracies(config, RunDirectory(run_dir), test)
    return accuracies[max(accuracies)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--comparisons", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: temporary)")
    parser.add_argument(
        "--same-total", type=int, help="also split this many comparisons over --clients"
    )
    args = parser.parse_args()

    base = pretrained_base(World(WorldConfig()), args.cache)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedrlhf-scale-") as tmp_dir:
        tmp = args.work_dir or tmp_dir
        for clients in args.clients:
            results.append(run_size(clients, args.comparisons, args.rounds, base, Path(tmp)))
            r = results[-1]
            print(f"done: {clients} clients, round {r['round']:.1f} s", flush=True)
        same_total = []
        for clients in args.clients if args.same_total else []:
            per_client = args.same_total // clients
            if per_client == args.comparisons:  # already run above
                same_total.append(next(r for r in results if r["clients"] == clients))
                continue
            same_total.append(run_size(clients, per_client, args.rounds, base, Path(tmp)))
            print(f"done: {clients} clients x {per_client} comparisons", flush=True)
    print(
        f"\nreward rounds, DP-SGD + SecAgg+, all sampled, {args.comparisons} comparisons per "
        f"client, {psutil.cpu_count()} cores; median over rounds 2-{args.rounds}"
    )
    print(
        "clients | round s | = local train + SecAgg+ + waiting | 1st round s | shares/threshold "
        "| B down / up per client (x adapter) | peak RSS"
    )
    for r in results:
        graph = r["share_graph"]
        print(
            f"{r['clients']:7d} | {r['round']:7.1f} | = {r['train']:5.1f} + {r['secagg']:5.1f} + "
            f"{r['waiting']:5.1f}        | {r['first_round']:11.1f} | "
            f"{graph['shares']:3d}/{graph['threshold']:<3d} (any {graph['tolerated_dropouts']} drop) "
            f"| {r['down']:,} / {r['up']:,} ({r['down'] / r['adapter']:.1f}x / "
            f"{r['up'] / r['adapter']:.1f}x) | {r['peak_memory'] / 2**30:.2f} GiB"
        )
    if same_total:
        print(
            f"\n{args.same_total} comparisons in all, {args.rounds} rounds, the same epsilon "
            f"per client; held-out accuracy on {TEST_PAIRS} pairs"
        )
        print("clients | comparisons each | accuracy | round s")
        for r in same_total:
            print(
                f"{r['clients']:7d} | {r['comparisons']:16d} | {r['accuracy']:8.3f} | "
                f"{r['round']:7.1f}"
            )


if __name__ == "__main__":
    main()
