"""The policy part of the simulation's report: what the policy rounds bought.

Every policy checkpoint (round 0 is the fresh adapter, i.e. the reference) generates
responses to held-out prompts that no store holds. Each response is scored by the
federation's reward model, its KL to the reference is measured on the same samples,
and its reward-model win rate over the reference's samples (round 0, same prompts
and seeds) is counted. In the synthetic world each response is also scored by the
hidden utility (the organizations' mean), which real deployments cannot know. The
round lines join the server's metrics (beta, trust region, the clients' aggregated
KL and score) and the plots show utility (or reward score) and KL per round.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ppo_training import SamplingSettings, generate_rollouts
from common.config import RunConfig
from common.model import build_reward_model, load_base, score_responses
from common.policy_model import add_policy
from common.ppo import kl_per_token
from server.checkpoints import RunDirectory
from simulations.figures import plt, save_figure
from simulations.kl_frontier import (
    FRONTIER_SAMPLES,
    Frontier,
    reference_samples,
    tilted_frontier,
)

KL_OPTIMAL_SHARE = 0.8
"""The policy phase's target: this share of the best gain possible at its final KL."""
EVAL_SAMPLES_PER_PROMPT = 2
EVAL_SEED = 12345
"""Every checkpoint samples with the same seed: differences are the policy's."""


UtilityFn = Callable[[str, str], float]
"""(prompt, response) -> the hidden true utility (the synthetic world only)."""


def evaluation_models(config: RunConfig):  # noqa: ANN201
    """(reward model, policy, tokenizer) on one base, as the run built them."""
    base, tokenizer = load_base(config.model.base, seed=config.seed)
    reward = build_reward_model(base, config.model, seed=config.seed)
    return reward, add_policy(reward.lm, config.policy_model, seed=config.seed + 1), tokenizer


def policy_rounds(
    config: RunConfig,
    run_dir: Path,
    prompts: list[str],
    utility: UtilityFn | None,
    models: tuple | None = None,
) -> list[dict[str, Any]]:
    """Reward score, KL, win rate (and true utility) of each policy checkpoint's samples
    (``models``: :func:`evaluation_models`, built here if not given)."""
    run = RunDirectory(run_dir)
    checkpoints = sorted(run.checkpoints.glob("policy-round-*"))
    if not checkpoints:
        return []
    reward, policy, tokenizer = models or evaluation_models(config)
    prompts = prompts * EVAL_SAMPLES_PER_PROMPT
    sampling = SamplingSettings.of(config.policy)
    history = [
        json.loads(line) for line in run.metrics_file.read_text().splitlines() if line.strip()
    ]
    trained = {h["round"]: h for h in history if h["phase"] == "policy" and h["task"] == "train"}
    rows = []
    reference_scores = None
    fresh = {name: t.detach().clone() for name, t in policy.trainable_state().items()}
    for checkpoint in checkpoints:
        saved = run.load(checkpoint)
        reward.load_trainable_state(saved.reward)
        # A forked run's first checkpoint keeps no policy adapter: it is the reference.
        policy.load_trainable_state(saved.policy if saved.policy is not None else fresh)
        round_ = int(checkpoint.name.rsplit("-", 1)[1])

        def score(p, r):  # noqa: ANN001, ANN202
            return score_responses(reward, tokenizer, p, r, config.model.max_length)

        rollouts = generate_rollouts(policy, tokenizer, prompts, score, sampling, EVAL_SEED)
        kl = kl_per_token(rollouts.logp_old, rollouts.logp_ref, "k1") * rollouts.response_mask
        if reference_scores is None:
            reference_scores = rollouts.scores
        gap = (rollouts.scores.cpu() - reference_scores.cpu()).numpy()
        server = trained.get(round_ + 1, {})  # round r + 1 started from this checkpoint
        row = {
            "round": round_,
            "reward_score_mean": float(rollouts.scores.mean()),
            "win_rate_vs_reference": float(
                np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0)).mean()
            ),
            "kl_to_reference": float(kl.sum(dim=1).mean()),
            "ended_share": float(rollouts.ended.float().mean()),
            "beta": server.get("beta", saved.state.kl_controller.get("beta")),
            "clients_score": server.get("score"),
            "clients_kl": server.get("kl"),
            "trust_region_scale": trained.get(round_, {}).get("trust_region_scale"),
            "example": f"{prompts[0]} -> {rollouts.responses[0]}",
        }
        if utility is not None:
            values = np.array(
                [utility(p, r) for p, r in zip(prompts, rollouts.responses, strict=True)]
            )
            row.update(true_utility_mean=float(values.mean()), true_utility_sd=float(values.std()))
        rows.append(row)
    return rows


def kl_optimal_frontiers(
    config: RunConfig,
    run_dir: Path,
    prompts: list[str],
    utility: UtilityFn,
    samples: int = FRONTIER_SAMPLES,
    models: tuple | None = None,
) -> tuple[Frontier, Frontier | None]:
    """The world's KL-optimal frontier on the held-out prompts, and the true utility of
    the reference tilted by the run's reward model (None without reward rounds):
    :mod:`simulations.kl_frontier`."""
    reward, policy, tokenizer = models or evaluation_models(config)
    run = RunDirectory(run_dir)
    final = run.load(sorted(run.checkpoints.glob("policy-round-*"))[-1])
    reward.load_trainable_state(final.reward)

    def score(p, r):  # noqa: ANN001, ANN202
        return score_responses(reward, tokenizer, p, r, config.model.max_length)

    sampling = SamplingSettings.of(config.policy)
    utilities, scores = reference_samples(
        policy, tokenizer, prompts, utility, score, sampling, samples
    )
    by_reward = tilted_frontier(utilities, tilt_by=scores) if config.reward.rounds > 0 else None
    return tilted_frontier(utilities), by_reward


def policy_summary(
    config: RunConfig,
    rows: list[dict[str, Any]],
    frontier: Frontier | None = None,
    by_reward: Frontier | None = None,
) -> dict[str, Any]:
    """The headline figures and checks of the policy phase."""
    reference, final = rows[0], rows[-1]
    target = config.policy.kl_target
    summary: dict[str, Any] = {
        "objective": config.policy.method,
        "final_kl_to_reference": final["kl_to_reference"],
        "final_win_rate_vs_reference": final["win_rate_vs_reference"],
        "reference_reward_score": reference["reward_score_mean"],
        "final_reward_score": final["reward_score_mean"],
        "kl_target": target,
        "kl_bound": config.policy.kl_bound,
        "final_beta": final["beta"],
    }
    checks = {
        "final KL within the trust-region bound": final["kl_to_reference"]
        <= config.policy.kl_bound,
    }
    if "true_utility_mean" in reference:
        gain = final["true_utility_mean"] - reference["true_utility_mean"]
        sd = reference["true_utility_sd"]
        margin = gain / sd if sd > 0 else 0.0
        summary.update(
            reference_true_utility=reference["true_utility_mean"],
            reference_true_utility_sd=sd,
            final_true_utility=final["true_utility_mean"],
            final_true_utility_sd=final["true_utility_sd"],
            utility_gain_in_reference_sd=margin,
        )
        checks["final policy's true utility above the reference's"] = gain > 0
        checks["true utility gain >= 1 reference SD"] = margin >= 1.0
        if frontier is not None:
            best = frontier.gain_at(final["kl_to_reference"])
            share = gain / best if best > 0 else 0.0
            summary.update(
                kl_optimal_gain_at_final_kl_in_sd=best / sd if sd > 0 else 0.0,
                share_of_kl_optimal_gain=share,
                kl_optimal_frontier=frontier.to_json(sd),
            )
            checks[
                f"true utility gain >= {KL_OPTIMAL_SHARE:.0%} of the KL-optimal gain at its KL"
            ] = share >= KL_OPTIMAL_SHARE
        if by_reward is not None:
            summary.update(
                reward_model_tilt_gain_at_final_kl_in_sd=(
                    by_reward.gain_at(final["kl_to_reference"]) / sd if sd > 0 else 0.0
                ),
                reward_model_tilt_frontier=by_reward.to_json(sd),
            )
    else:
        checks["the federation's reward model prefers the final policy (win rate > 0.5)"] = (
            final["win_rate_vs_reference"] > 0.5
        )
    if config.policy.kl_control == "adaptive":
        checks["final KL within 50% of the KL target"] = (
            abs(final["kl_to_reference"] - target) <= 0.5 * target
        )
    summary["checks"] = checks
    return summary


def plot_policy(
    run_dir: Path,
    rows: list[dict[str, Any]],
    config: RunConfig,
    frontier: Frontier | None = None,
    by_reward: Frontier | None = None,
) -> None:
    rounds = [r["round"] for r in rows]
    truth = "true_utility_mean" in rows[0]
    mean = np.array([r["true_utility_mean" if truth else "reward_score_mean"] for r in rows])
    what = "true utility" if truth else "reward-model score"
    kl = [r["kl_to_reference"] for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    top.plot(rounds, mean, marker="o", label="policy's generations (mean)")
    top.axhline(mean[0], color="black", linestyle="--", label="reference (base model)")
    if truth:
        sd = np.array([r["true_utility_sd"] for r in rows])
        top.fill_between(rounds, mean - sd, mean + sd, alpha=0.15, label="+-1 SD")
        top.axhline(mean[0] + sd[0], color="gray", linestyle=":", label="reference + 1 SD")
    top.set_ylabel(f"{what} (held-out prompts)")
    top.set_title(f"Policy rounds ({config.policy.method}): {what} and KL")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(rounds, kl, marker="s", color="tab:orange", label="KL to reference")
    if config.policy.kl_control == "adaptive":
        bottom.axhline(config.policy.kl_target, color="green", linestyle="--", label="KL target")
    bottom.axhline(config.policy.kl_bound, color="red", linestyle=":", label="trust-region bound")
    bottom.set_xlabel("policy round")
    bottom.set_ylabel("KL (nats per response)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    save_figure(fig, run_dir / "policy_rounds.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(kl, mean, marker="o", label=config.policy.method)
    for r, x, y in zip(rounds, kl, mean, strict=True):
        ax.annotate(str(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if frontier is not None:
        _draw_frontier(ax, frontier, mean[0], max(kl), by_reward)
    ax.set_xlabel("KL to reference (nats per response)")
    ax.set_ylabel(f"{what} (mean)")
    ax.set_title(f"{what.capitalize()} bought per nat of KL (labels: round)")
    ax.grid(alpha=0.3)
    save_figure(fig, run_dir / "policy_utility_vs_kl.png")


def plot_objectives(path: Path, reports: dict[str, dict[str, Any]]) -> None:
    """Several runs' policy phases on the same world and budget: true utility against
    KL (each round a point, the KL-optimal frontier beside them), and KL per round."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    reference = next(iter(reports.values()))
    base = reference["reference_true_utility"]
    kl_max = 0.0
    for name, report in reports.items():
        rows = report["rounds"]
        kl = [r["kl_to_reference"] for r in rows]
        kl_max = max(kl_max, *kl)
        left.plot(kl, [r["true_utility_mean"] for r in rows], marker="o", label=name)
        right.plot([r["round"] for r in rows], kl, marker="s", label=name)
    if "kl_optimal_frontier" in reference:
        frontier, by_reward = (
            Frontier.from_json(reference[key]) if key in reference else None
            for key in ("kl_optimal_frontier", "reward_model_tilt_frontier")
        )
        _draw_frontier(left, frontier, base, kl_max, by_reward)
    left.axhline(
        base + reference["reference_true_utility_sd"],
        color="gray",
        linestyle=":",
        label="reference + 1 SD",
    )
    left.set_xlabel("KL to reference (nats per response)")
    left.set_ylabel("true utility (held-out prompts)")
    right.axhline(reference["kl_target"], color="green", linestyle="--", label="KL target")
    right.set_xlabel("policy round")
    right.set_ylabel("KL to reference (nats per response)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Same world, same privacy budget: " + " vs ".join(n.upper() for n in reports))
    save_figure(fig, path)


def _draw_frontier(
    ax,  # noqa: ANN001
    frontier: Frontier,
    reference: float,
    kl_max: float,
    by_reward: Frontier | None = None,
) -> None:
    """The KL-optimal frontier (reference tilted by exp(utility / t)) up to the KLs shown,
    and the truth of the reference tilted by the reward model."""
    for curve, style, label in (
        (frontier, "--", "KL-optimal (reference tilted by exp(utility / t))"),
        (by_reward, ":", "reference tilted by the reward model (truth of)"),
    ):
        if curve is None:
            continue
        keep = curve.kl <= max(kl_max, 0.1) * 1.5
        ax.plot(
            curve.kl[keep], reference + curve.gain[keep], color="black", linestyle=style,
            label=label,
        )  # fmt: skip
    ax.legend(fontsize=8)


@torch.no_grad()
def build_policy_report(
    config: RunConfig,
    run_dir: Path,
    prompts: list[str],
    utility: UtilityFn | None = None,
    frontier_samples: int = FRONTIER_SAMPLES,
) -> dict[str, Any] | None:
    """The ``policy`` section of report.json (None when the run had no policy rounds)."""
    if not any(RunDirectory(run_dir).checkpoints.glob("policy-round-*")):
        return None
    models = evaluation_models(config)  # one base for every checkpoint and the frontier
    rows = policy_rounds(config, run_dir, prompts, utility, models)
    frontier, by_reward = (
        kl_optimal_frontiers(config, run_dir, prompts, utility, frontier_samples, models)
        if utility is not None
        else (None, None)
    )
    plot_policy(run_dir, rows, config, frontier, by_reward)
    return {**policy_summary(config, rows, frontier, by_reward), "rounds": rows}
