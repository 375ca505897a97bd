"""The simulation's report: what the federation learned, against its baselines.

Reads the server's run directory (checkpoints, metrics) and the simulated clients'
stores (ledgers), scores every round's global reward model on the test set (the
world's, or the researcher's labeled test file), and writes ``report.json``,
``rounds.csv`` and PNG plots next to them, with one plain sentence on what
federation and DP cost on this data.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.privacy_report import privacy_report
from client.store import PreferenceStore
from common.config import RunConfig
from common.dp_randomness import randomness_name
from common.model import build_reward_model, load_base
from common.privacy import epsilon
from server.checkpoints import RunDirectory
from simulations.baselines import TestSet
from simulations.figures import plt, save_figure


@dataclass(frozen=True)
class Baselines:
    centralized: float
    single_org: list[float]
    bayes: float | None
    """The Bayes-optimal accuracy (known in the synthetic world only)."""
    centralized_dp: float | None = None


def round_accuracies(config: RunConfig, run: RunDirectory, test: TestSet) -> dict[int, float]:
    """Test accuracy of the global reward model after each reward round (0 = initial)."""
    base, _ = load_base(config.model.base, seed=config.seed)
    model = build_reward_model(base, config.model, seed=config.seed)
    out = {}
    for checkpoint in sorted(run.checkpoints.glob("reward-round-*")):
        model.load_trainable_state(run.load(checkpoint).reward)
        out[int(checkpoint.name.rsplit("-", 1)[1])] = test.accuracy(model)
    return out


def client_epsilons(config: RunConfig, stores: list[Path]) -> list[float]:
    eps = []
    for path in stores:
        with PreferenceStore(path) as store:
            eps.append(
                epsilon(store.privacy_events(), config.privacy.delta, config.privacy.accountant)
            )
    return eps


def _audit(config: RunConfig, path: Path) -> dict[str, Any]:
    """A client's privacy report, compositions by subset name, plus its statistics charges."""
    with PreferenceStore(path) as store:
        report = privacy_report(store, config.privacy.delta)
    audit: dict[str, Any] = {c["subset"]: c["epsilon"] for c in report["compositions"]}
    audit["statistics"] = [m for m in report["mechanisms"] if m["mechanism"] == "statistics"]
    return audit


def epsilon_by_round(config: RunConfig, stores: list[Path], phase: str) -> dict[int, float]:
    """Mean over clients of the epsilon spent up to the end of each round of ``phase``,
    read from their ledgers (the server never learns it)."""
    per_client: list[dict[int, float]] = []
    for path in stores:
        with PreferenceStore(path) as store:
            ledger = store.ledger()
        spent, rounds = [], {}
        for entry in ledger:
            spent.append(entry.event)
            if entry.phase == phase:
                rounds[entry.round] = spent.copy()
        per_client.append(
            {
                r: epsilon(events, config.privacy.delta, config.privacy.accountant)
                for r, events in rounds.items()
            }
        )
    rounds = sorted(set().union(*per_client)) if per_client else []
    return {r: statistics.mean(c.get(r, 0.0) for c in per_client) for r in rounds}


def build_report(
    config: RunConfig,
    run_dir: Path,
    stores: list[Path],
    test: TestSet,
    baselines: Baselines,
    scenario: dict[str, Any],
) -> dict[str, Any]:
    eps = client_epsilons(config, stores)
    audits = [_audit(config, path) for path in stores]
    privacy = {
        "dp": config.privacy.enabled,
        "secure_aggregation": config.federation.secure_aggregation,
        **scenario,
        "epsilon_per_client": eps,
        "epsilon_budget": config.privacy.epsilon,
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "dp_randomness": randomness_name(config.privacy.secure_noise),
        # The same ledgers composed by a second accountant, and the statistics alone.
        "epsilon_per_client_prv": [a["all"]["prv"] for a in audits],
        "statistics_share": config.privacy.statistics_share,
        "statistics_epsilon_alone_per_client": [
            a.get("mechanism=statistics", {}).get("rdp", 0.0) for a in audits
        ],
        "statistics_noise_multiplier": sorted(
            {m["noise_multiplier"] for a in audits for m in a["statistics"]}
        ),
    }
    privacy_checks = {
        "epsilon <= budget for every client": (not config.privacy.enabled)
        or max(eps) <= config.privacy.epsilon + 1e-6,
        "delta <= 1e-5": config.privacy.delta <= 1e-5,
    }
    if config.reward.rounds == 0:  # e.g. DPO straight on the comparisons
        report = {**privacy, "checks": privacy_checks}
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        _plot_epsilon(run_dir / "epsilon_per_client.png", report)
        return report
    run = RunDirectory(run_dir)
    history = [
        h
        for h in (
            json.loads(line) for line in run.metrics_file.read_text().splitlines() if line.strip()
        )
        if h["phase"] == "reward"
    ]
    accuracies = round_accuracies(config, run, test)
    spent = epsilon_by_round(config, stores, "reward")
    train_rounds = [h for h in history if h["task"] == "train"]
    final_round = max(accuracies)
    final = accuracies[final_round]
    median_single = statistics.median(baselines.single_org)
    rounds = []
    for r, acc in sorted(accuracies.items()):
        fed = next((h for h in history if h["evaluated_model_round"] == r), {})
        trained = next((h for h in train_rounds if h["round"] == r), {})
        rounds.append(
            {
                "round": r,
                "test_accuracy": acc,
                "federated_heldout_accuracy": fed.get("fed_eval_accuracy"),
                "epsilon_mean": spent.get(r, 0.0),
                "bytes_down_per_client": trained.get("bytes_down_per_client", 0),
                "bytes_up_per_client": trained.get("bytes_up_per_client", 0),
                "survivors": trained.get("survivors"),
                "seconds": trained.get("seconds"),
            }
        )
    adapter_bytes = history[0]["adapter_bytes"] if history else 0
    full_bytes = history[0]["full_model_bytes"] if history else 0
    report = {
        **privacy,
        "test_comparisons": len(test),
        "bayes_ceiling": baselines.bayes,
        "centralized_non_dp_accuracy": baselines.centralized,
        "centralized_dp_accuracy": baselines.centralized_dp,
        "single_org_accuracies": baselines.single_org,
        "single_org_median_accuracy": median_single,
        "federated_final_accuracy": final,
        "federated_minus_centralized_points": 100 * (final - baselines.centralized),
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": full_bytes,
        "model_to_adapter_ratio": full_bytes / adapter_bytes if adapter_bytes else None,
        "rounds": rounds,
    }
    checks = {}
    if baselines.bayes is not None:
        report["centralized_share_of_bayes"] = baselines.centralized / baselines.bayes
        report["federated_share_of_bayes"] = final / baselines.bayes
        checks["centralized >= 95% of Bayes"] = report["centralized_share_of_bayes"] >= 0.95
    report["checks"] = {
        **checks,
        "federated within 3 points of centralized": report["federated_minus_centralized_points"]
        >= -3.0,
        "federated beats median single organization": final > median_single,
        **privacy_checks,
    }
    report["summary"] = cost_sentence(report)
    _write(run_dir, report)
    return report


def cost_sentence(report: dict[str, Any]) -> str:
    """What federation and DP cost on this data, in one sentence a person reads."""
    dp = "with DP" if report["dp"] else "without DP"
    sa = " and SecAgg+" if report["secure_aggregation"] else ""
    fed, central = report["federated_final_accuracy"], report["centralized_non_dp_accuracy"]
    text = (
        f"On this data the federation {dp}{sa} reaches {fed:.3f} test accuracy, "
        f"{abs(fed - central) * 100:.1f} points {'below' if fed < central else 'above'} "
        f"training centrally on the pooled data without DP ({central:.3f})"
    )
    central_dp = report.get("centralized_dp_accuracy")
    if central_dp is not None:
        gap = (fed - central_dp) * 100
        text += (
            f"; DP-SGD centrally on the pooled data at the same epsilon reaches "
            f"{central_dp:.3f}, {abs(gap):.1f} points {'below' if gap > 0 else 'above'} "
            "the federation"
        )
    single = report["single_org_median_accuracy"]
    if single == single:  # not NaN (no baselines)
        text += f"; the median organization alone reaches {single:.3f}"
    return text + "."


def _write(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    with (run_dir / "rounds.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(report["rounds"][0]))
        writer.writeheader()
        writer.writerows(report["rounds"])
    _plot_accuracy(run_dir / "reward_accuracy.png", report)
    _plot_epsilon(run_dir / "epsilon_per_client.png", report)
    _plot_bytes(run_dir / "bytes_per_round.png", report)


def _plot_accuracy(path: Path, report: dict[str, Any]) -> None:
    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    label = (
        "federated"
        + (" + DP" if report["dp"] else " (DP OFF)")
        + (" + SecAgg+" if report["secure_aggregation"] else "")
    )
    ax.plot(rounds, [r["test_accuracy"] for r in report["rounds"]], marker="o", label=label)
    fed = [
        (r["round"], r["federated_heldout_accuracy"])
        for r in report["rounds"]
        if r["federated_heldout_accuracy"] is not None
    ]
    if fed:
        ax.plot(
            *zip(*fed, strict=True),
            linestyle=":",
            marker=".",
            label="federated evaluation (clients' held-out labels)",
        )
    if report["bayes_ceiling"] is not None:
        ax.axhline(
            report["bayes_ceiling"], color="black", linestyle="--", label="Bayes-optimal ceiling"
        )
        ax.axhline(
            0.95 * report["bayes_ceiling"], color="gray", linestyle=":", label="95% of ceiling"
        )
    ax.axhline(
        report["centralized_non_dp_accuracy"],
        color="green",
        linestyle="-.",
        label="centralized, non-DP",
    )
    if report.get("centralized_dp_accuracy") is not None:
        ax.axhline(
            report["centralized_dp_accuracy"],
            color="purple",
            linestyle="--",
            label="centralized, DP (same epsilon)",
        )
    ax.axhline(
        report["single_org_median_accuracy"],
        color="red",
        linestyle="-.",
        label="single organization (median)",
    )
    ax.set_xlabel("reward round")
    ax.set_ylabel(
        "test accuracy" + ("" if report["bayes_ceiling"] is None else " (expected, vs. annotators)")
    )
    ax.set_title("Reward model accuracy per round")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_epsilon(path: Path, report: dict[str, Any]) -> None:
    eps = report["epsilon_per_client"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([f"org-{i}" for i in range(len(eps))], eps)
    ax.axhline(
        report["epsilon_budget"],
        color="red",
        linestyle="--",
        label=f"budget {report['epsilon_budget']}",
    )
    ax.set_ylabel(f"epsilon (delta={report['delta']:g}, {report['accountant']})")
    ax.set_title("Privacy spent per client, composed over the run")
    ax.legend()
    save_figure(fig, path)


def _plot_bytes(path: Path, report: dict[str, Any]) -> None:
    rows = [r for r in report["rounds"] if r["bytes_down_per_client"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [r["round"] for r in rows],
        [r["bytes_down_per_client"] for r in rows],
        marker="o",
        label="server -> client",
    )
    ax.plot(
        [r["round"] for r in rows],
        [r["bytes_up_per_client"] for r in rows],
        marker="s",
        label="client -> server (masked)",
    )
    ax.axhline(
        report["full_model_bytes"], color="red", linestyle="--", label="sending the whole model"
    )
    ax.axhline(
        report["adapter_bytes"], color="gray", linestyle=":", label="adapter + head (float32)"
    )
    ax.set_yscale("log")
    ax.set_xlabel("reward round")
    ax.set_ylabel("payload bytes per client")
    ax.set_title("Communication per round")
    ax.legend(fontsize=8)
    save_figure(fig, path)
