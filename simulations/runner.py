"""The one-machine simulation, end to end.

1. the organizations: the synthetic world (its tiny base pretrained on its text, once),
   or a researcher's own data (``--data``, split per file or by a partitioner);
2. fill one SQLite store per organization;
3. train the baselines on the same data (centralized non-DP and DP, each organization
   alone);
4. run the real ServerApp and ClientApp under Flower's simulation engine
   (``flwr run`` against our own loopback SuperLink), showing progress;
5. score every round's checkpoint on the test set and write the report.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.store import NewComparison, PreferenceStore
from common.config import RunConfig
from common.english_base import default_cache_dir
from common.model import load_base, resolve_base
from common.processes import APP_DIR, stop_process_tree, write_run_config
from server.checkpoints import RunDirectory
from simulations.baselines import (
    TestSet,
    build_test_set,
    labeled_test_set,
    train_dp_central,
    train_non_dp,
)
from simulations.flower_runtime import SimulationSuperLink
from simulations.kl_frontier import FRONTIER_SAMPLES
from simulations.policy_fork import fork_policy_phase
from simulations.policy_report import build_policy_report, plot_objectives
from simulations.pretrain import PretrainConfig, pretrained_base
from simulations.report import Baselines, build_report
from simulations.round_timeline import round_timeline
from simulations.user_data import DataOptions, UserData
from simulations.world import World, WorldConfig, heldout_prompts

log = logging.getLogger(__name__)
console = Console()


@dataclass
class SimulationOptions:
    out_dir: Path
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataOptions | None = None
    """A researcher's own preference data instead of the synthetic world."""
    overrides: dict[str, bool | int | float | str] = field(default_factory=dict)
    """Run-config overrides (flat keys, as for ``flwr run --run-config``)."""
    cache_dir: Path = field(default_factory=default_cache_dir)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    baselines: bool = True
    compare_objectives: bool = False
    """After the run, run the policy phase again with every other method (DPO, PPO-GAE,
    RLOO, GRPO), forked from this run's reward phase, and compare them all."""
    timeout: float = 3600.0
    frontier_samples: int = FRONTIER_SAMPLES
    """Reference responses per held-out prompt for the KL-optimal frontier."""


def fill_stores(world: World, config: RunConfig, stores_dir: Path) -> list[Path]:
    """One store per organization: its annotators' comparisons, and its prompts for
    policy rounds."""
    shutil.rmtree(stores_dir, ignore_errors=True)
    paths = []
    for org in world.organizations:
        path = stores_dir / f"org-{org.index}.sqlite"
        with PreferenceStore(path) as store:
            store.add_comparisons(
                (
                    NewComparison(
                        prompt, chosen, rejected, annotator=f"sim-{org.name}", origin="simulation"
                    )
                    for prompt, chosen, rejected in world.local_comparisons(org.index)
                ),
                source="simulated",
            )
            store.add_prompts(world.policy_prompts(org.index))
        paths.append(path)
    return paths


POLICY_EVAL_PROMPTS = 64
"""Distinct test prompts a user-data run's policy checkpoints are judged on."""


class WorldScenario:
    """The synthetic world: its truth scores the reward model and the policy."""

    def __init__(self, options: SimulationOptions) -> None:
        self.world = World(options.world)
        self.options = options
        self.organizations = options.world.organizations

    def base(self, overrides: dict) -> str:
        return str(pretrained_base(self.world, self.options.cache_dir, self.options.pretrain))

    def fill_stores(self, config: RunConfig, run_dir: Path) -> list[Path]:
        return fill_stores(self.world, config, run_dir / "stores")

    def test_set(self, tokenizer, max_length: int) -> TestSet:  # noqa: ANN001
        return build_test_set(self.world, tokenizer, max_length)

    def describe(self) -> dict:
        return {
            "world": {
                **asdict(self.options.world),
                "organization_tilts": [o.tilt for o in self.world.organizations],
            }
        }

    def policy_report(self, config: RunConfig, run_dir: Path) -> dict | None:
        return build_policy_report(
            config,
            run_dir,
            heldout_prompts(),
            self.world.federation_utility,
            frontier_samples=self.options.frontier_samples,
        )


class DataScenario:
    """A researcher's own comparisons: judged by their labels, no hidden truth."""

    def __init__(self, options: SimulationOptions) -> None:
        assert options.data is not None
        self.data = UserData.load(options.data)
        self.organizations = len(self.data.organizations)

    def base(self, overrides: dict) -> str:
        return resolve_base(str(overrides.get("model.base", RunConfig().model.base)))

    def fill_stores(self, config: RunConfig, run_dir: Path) -> list[Path]:
        return self.data.fill_stores(run_dir / "data", run_dir / "stores")

    def test_set(self, tokenizer, max_length: int) -> TestSet:  # noqa: ANN001
        return labeled_test_set(self.data.test, tokenizer, max_length)

    def describe(self) -> dict:
        return {"data": {"organizations": self.data.names, **self.data.description}}

    def policy_report(self, config: RunConfig, run_dir: Path) -> dict | None:
        prompts = list(dict.fromkeys(c.prompt for c in self.data.test))[:POLICY_EVAL_PROMPTS]
        return build_policy_report(config, run_dir, prompts)


Scenario = WorldScenario | DataScenario


def _run_baselines(config: RunConfig, stores: list[Path], test: TestSet) -> Baselines:
    split = config.reward.heldout_fraction
    per_org = []
    for path in stores:
        with PreferenceStore(path) as store:
            per_org.append(store.comparisons("train", split))
    pooled = [c for org in per_org for c in org]
    with console.status("baseline: centralized, non-DP, all organizations' data"):
        centralized = test.accuracy(train_non_dp(config, pooled, seed=1))
    console.print(f"baseline centralized non-DP accuracy {centralized:.4f}")
    central_dp = None
    if config.privacy.enabled and config.reward.rounds > 0:
        with console.status(f"baseline: centralized, DP at epsilon {config.reward_epsilon:g}"):
            model, sigma = train_dp_central(config, pooled, 1)
            central_dp = test.accuracy(model)
        console.print(
            f"baseline centralized DP accuracy {central_dp:.4f} (noise multiplier {sigma:.3f})"
        )
    single = []
    for i, comparisons in enumerate(per_org):
        with console.status(f"baseline: org-{i} alone, non-DP"):
            single.append(test.accuracy(train_non_dp(config, comparisons, seed=2 + i)))
    console.print(
        "baseline single-organization accuracies " + ", ".join(f"{a:.4f}" for a in single)
    )
    return Baselines(centralized, single, test.bayes_ceiling, central_dp)


def federate(
    config: RunConfig, overrides: dict, run_dir: Path, organizations: int, timeout: float
) -> None:
    """``flwr run`` under our own SuperLink, with a progress bar fed by metrics.jsonl."""
    flower_home = run_dir / "flower-home"
    log_file = run_dir / "flower.log"
    config_file = write_run_config(run_dir / "run_config_overrides.toml", overrides)
    metrics = run_dir / "metrics.jsonl"
    total = (
        config.reward.rounds
        + (config.reward.rounds > 0)
        + config.policy.rounds
        + (config.policy.rounds > 0)
    )
    with SimulationSuperLink(flower_home, log_file) as superlink:
        process = superlink.run(APP_DIR, config_file, organizations, log_file)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        deadline = time.monotonic() + timeout
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("federated reward rounds: starting Flower", total=total)
                while process.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"simulation did not finish within {timeout} s; see {log_file}"
                        )
                    lines = metrics.read_text().splitlines() if metrics.exists() else []
                    if lines:
                        progress.update(
                            task,
                            completed=len(lines),
                            description=_progress_line(json.loads(lines[-1])),
                        )
                    time.sleep(1.0)
                progress.update(
                    task, completed=len(metrics.read_text().splitlines()) if metrics.exists() else 0
                )
        finally:
            stop_process_tree(process)
    latest = RunDirectory(run_dir).latest()
    finished = latest is not None and json.loads((latest / "state.json").read_text())["finished"]
    if process.returncode != 0 or not finished:
        raise RuntimeError(
            f"the federated run failed (flwr exit code {process.returncode}); see {log_file}"
        )


RL_SIZES = {
    "policy.iterations": 2,
    "policy.learning-rate": 0.2,
    "policy.max-grad-norm": 0.2,
}
"""The RL methods' sizes (the defaults): each prompt costs generations, and under DP few
large steps are their best case."""
METHODS: dict[str, dict[str, bool | int | float | str]] = {
    "dpo": {  # a comparison's step is cheap: many steps on large batches
        "policy.objective": "dpo",
        "policy.iterations": 8,
        "policy.batch-size": 256,
        "policy.learning-rate": 0.04,
        "policy.max-grad-norm": 4.0,
    },
    "ppo": {
        **RL_SIZES,
        "policy.objective": "ppo",
        "policy.advantage": "gae",
        "policy.samples-per-prompt": 1,
        "policy.batch-size": 128,
    },
    "rloo": {
        **RL_SIZES,
        "policy.objective": "ppo",
        "policy.advantage": "rloo",
        "policy.samples-per-prompt": 4,
        "policy.batch-size": 64,
    },
    "grpo": {
        **RL_SIZES,
        "policy.objective": "ppo",
        "policy.advantage": "grpo",
        "policy.samples-per-prompt": 4,
        "policy.batch-size": 64,
        "policy.kl-penalty": "loss",
    },
}
"""What ``--compare-objectives`` runs besides the run's own method (``--set`` wins)."""


def _run_other_methods(
    scenario: Scenario,
    config: RunConfig,
    stores: list[Path],
    overrides: dict,
    run_dir: Path,
    options: SimulationOptions,
) -> dict[str, dict]:
    """The policy phase with every other method, each forked from this run at the end of
    its reward phase (:mod:`simulations.policy_fork`): the same reward model, stores and
    remaining budget."""
    reports = {}
    for method, settings in METHODS.items():
        if method == config.policy.method:
            continue
        method_dir = run_dir / method
        method_overrides = {
            **settings,
            **{k: v for k, v in overrides.items() if k not in settings},
            "run-dir": str(method_dir),
            "client.store": str(method_dir / "stores" / "org-{partition-id}.sqlite"),
        }
        method_config = RunConfig().replace(**method_overrides)
        fork_policy_phase(run_dir, method_dir, stores)
        console.print(f"[bold]{method.upper()} from the same reward model[/bold] -> {method_dir}")
        federate(
            method_config, method_overrides, method_dir, scenario.organizations, options.timeout
        )
        with console.status(f"generating with every {method.upper()} round's policy"):
            reports[method] = scenario.policy_report(method_config, method_dir)
    return reports


def _progress_line(last: dict) -> str:
    where = f"{last['phase']} round {last['round']} {last['task']}"
    if last["phase"] == "policy":
        return f"{where}: score {last['score']:.2f}, KL {last['kl']:.2f} (noised)"
    acc = last["fed_eval_accuracy"]
    return f"{where}: held-out acc {acc:.3f} (noised)" if acc is not None else where


def clear_run(run_dir: Path) -> None:
    """Remove an earlier run's checkpoints, so the server starts afresh instead of resuming."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("LATEST", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


@contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds of one step of the simulation to ``timings``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)


def run_simulation(options: SimulationOptions) -> dict:
    run_dir = options.out_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    scenario: Scenario = DataScenario(options) if options.data else WorldScenario(options)
    console.print(f"[bold]fedrlhf simulation[/bold] -> {run_dir}")
    with _step(timings, "base model"):
        base = scenario.base(options.overrides)
    stores_dir = run_dir / "stores"
    overrides = {
        # Seeded DP noise unless asked otherwise: a simulation is for reproducible figures.
        "privacy.secure-noise": False,
        **options.overrides,
        "run-dir": str(run_dir),
        "model.base": base,
        "client.store": str(stores_dir / "org-{partition-id}.sqlite"),
        "federation.min-clients": options.overrides.get(
            "federation.min-clients", scenario.organizations
        ),
    }
    config = RunConfig().replace(**overrides)
    with _step(timings, "stores and test set"):
        stores = scenario.fill_stores(config, run_dir)
        _, tokenizer = load_base(base)
        test = scenario.test_set(tokenizer, config.model.max_length)
    with PreferenceStore(stores[0]) as first:
        console.print(
            f"{len(stores)} organizations ({first.counts()['comparisons']} comparisons in the "
            f"first), stores in {stores_dir}"
        )
    with _step(timings, "baselines"):
        if options.baselines:
            baselines = _run_baselines(config, stores, test)
        else:
            baselines = Baselines(float("nan"), [float("nan")], test.bayes_ceiling)
    clear_run(run_dir)
    with _step(timings, "federation"):
        federate(config, overrides, run_dir, scenario.organizations, options.timeout)

    scoring = console.status("scoring every round's reward model on the test set")
    with _step(timings, "scoring reward checkpoints"), scoring:
        report = build_report(config, run_dir, stores, test, baselines, scenario.describe())
    generating = console.status("generating with every round's policy on held-out prompts")
    with _step(timings, "scoring policy checkpoints"), generating:
        report["policy"] = scenario.policy_report(config, run_dir)
    if options.compare_objectives and report["policy"]:
        with _step(timings, "other methods"):
            others = _run_other_methods(scenario, config, stores, overrides, run_dir, options)
        report["comparison"] = others
        plot_objectives(
            run_dir / "objectives.png", {config.policy.method: report["policy"], **others}
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["step_seconds"] = timings
    report["round_timeline"] = round_timeline(run_dir / "metrics.jsonl", stores)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    _print_summary(report, run_dir)
    return report


def _print_summary(report: dict, run_dir: Path) -> None:
    table = Table(title="fedrlhf simulation")
    table.add_column("what")
    table.add_column("value", justify="right")
    dp = "DP" if report["dp"] else "DP OFF"
    sa = " + SecAgg+" if report["secure_aggregation"] else ""
    if "federated_final_accuracy" in report:
        if report["bayes_ceiling"] is not None:
            table.add_row("reward model: Bayes-optimal ceiling", f"{report['bayes_ceiling']:.4f}")
        table.add_row("centralized, non-DP", f"{report['centralized_non_dp_accuracy']:.4f}")
        if report["centralized_dp_accuracy"] is not None:
            table.add_row(
                "centralized, DP (same epsilon)", f"{report['centralized_dp_accuracy']:.4f}"
            )
        table.add_row("single organization, median", f"{report['single_org_median_accuracy']:.4f}")
        table.add_row(f"federated + {dp}{sa}, final", f"{report['federated_final_accuracy']:.4f}")
        table.add_row(
            "adapter bytes / full model bytes",
            f"{report['adapter_bytes']:,} / {report['full_model_bytes']:,}",
        )
    eps = report["epsilon_per_client"]
    table.add_row(
        f"epsilon per client (max / median), {dp}{sa}",
        f"{max(eps):.3f} / {statistics.median(eps):.3f}",
    )
    if report["dp"]:
        table.add_row("DP noise and sampling", report["dp_randomness"])
        table.add_row(
            f"epsilon per client, max: {report['accountant'].upper()} (enforced) / PRV",
            f"{max(eps):.3f} / {max(report['epsilon_per_client_prv']):.3f}",
        )
        sigmas = report["statistics_noise_multiplier"]
        table.add_row(
            "statistics releases: noise multiplier; their epsilon alone (max)",
            (f"{min(sigmas):.2f}-{max(sigmas):.2f}" if sigmas else "-")
            + f"; {max(report['statistics_epsilon_alone_per_client']):.3f}",
        )
    steps = ", ".join(f"{name} {seconds:.0f}" for name, seconds in report["step_seconds"].items())
    table.add_row("wall time (s)", f"{report['seconds']:.0f}: {steps}")
    for phase, line in report["round_timeline"].items():
        table.add_row(f"{phase} round, median s", line["summary"])
    policy = report.get("policy")
    if policy and "final_true_utility" in policy:
        table.add_row(
            f"policy ({policy['objective']}): true utility, reference -> final",
            f"{policy['reference_true_utility']:.3f} -> {policy['final_true_utility']:.3f}",
        )
        table.add_row(
            "utility gain in reference SDs", f"{policy['utility_gain_in_reference_sd']:+.2f}"
        )
        if "share_of_kl_optimal_gain" in policy:
            table.add_row(
                "KL-optimal gain at that KL (share reached)",
                f"{policy['kl_optimal_gain_at_final_kl_in_sd']:+.2f} SD "
                f"({policy['share_of_kl_optimal_gain']:.0%})",
            )
    if policy:
        table.add_row(
            f"policy ({policy['objective']}): reward-model win rate over the reference",
            f"{policy['final_win_rate_vs_reference']:.3f}",
        )
        table.add_row(
            "final KL to reference (target)",
            f"{policy['final_kl_to_reference']:.2f} ({policy['kl_target']:g})",
        )
    for method, other in (report.get("comparison") or {}).items():
        if "final_true_utility" in other:
            share = other.get("share_of_kl_optimal_gain")
            table.add_row(
                f"{method.upper()} instead: true utility, reference -> final",
                f"{other['reference_true_utility']:.3f} -> {other['final_true_utility']:.3f} "
                f"({other['utility_gain_in_reference_sd']:+.2f} SD, "
                f"KL {other['final_kl_to_reference']:.2f}"
                + (f", {share:.0%} of KL-optimal" if share is not None else "")
                + ")",
            )
        else:
            table.add_row(
                f"{method.upper()} instead: win rate over the reference, KL",
                f"{other['final_win_rate_vs_reference']:.3f}, {other['final_kl_to_reference']:.2f}",
            )
    console.print(table)
    if "summary" in report:
        console.print(report["summary"])
    checks = {**report["checks"], **(policy["checks"] if policy else {})}
    for check, ok in checks.items():
        console.print(f"  {'[green]PASS' if ok else '[red]FAIL'}[/] {check}")
    console.print(f"report: {run_dir / 'report.json'}; plots: {run_dir}/*.png")
