"""How many labels does uncertainty-first pair selection save? Measured in the world.

Two annotation campaigns draw pairs from the same pool of unlabeled candidate pairs
and get labels from the world's Bradley-Terry annotators:

* ``random``: each batch of pairs is drawn uniformly at random;
* ``uncertainty``: each batch is the head of the labeling queue the partners use
  (:func:`client.pair_selection.order_pairs` on the current reward model's margins,
  with its share of random pairs).

After each batch a reward model is retrained (non-DP, the clients' trainer) on all
labels so far and scored on the world's test set. Single points of such curves are
noisy (a retrained model moves by a point or two), so each campaign's mean curve is
fitted with a learning curve ``acc(n) = a - b * n^(-c)``; the report gives the raw
curves, the fits, and the labels uncertainty-first needs to reach the accuracy random
selection has at the full budget (both read off the fits).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from scipy.optimize import curve_fit

from client.label_queue import QueueSettings
from client.pair_selection import order_pairs
from client.reward_training import OptimizerSettings, train_reward_model
from common.config import RunConfig
from common.model import (
    RewardModel,
    build_reward_model,
    encode_pairs,
    load_base,
    score_pairs,
)
from simulations.baselines import build_test_set
from simulations.figures import plt, save_figure
from simulations.pretrain import PretrainConfig, pretrained_base
from simulations.world import Pair, World, WorldConfig

log = logging.getLogger(__name__)
RANDOM_CAMPAIGN = "random"


@dataclass(frozen=True)
class StudyConfig:
    pool: int = 4000
    """Unlabeled candidate pairs, drawn across the organizations."""
    seed_labels: int = 100
    """Random labels both campaigns start from (no model exists before them)."""
    batch: int = 100
    budget: int = 1000
    random_fractions: tuple[float, ...] = (0.2, 0.5)
    """Shares of random pairs in the uncertainty-first queues compared (0.2 as deployed)."""
    epochs: float = 10.0
    min_steps: int = 60
    train_batch: int = 64
    repeats: int = 3


def _train(
    config: RunConfig,
    study: StudyConfig,
    pairs: list[Pair],
    labels: list[tuple[str, str]],
    seed: int,
) -> RewardModel:
    """A fresh reward model on the labels so far (non-DP: the question is which pairs)."""
    base, tokenizer = load_base(config.model.base, seed=config.seed)
    model = build_reward_model(base, config.model, seed=seed)
    encoded = encode_pairs(
        tokenizer,
        [p.prompt for p in pairs],
        [chosen for chosen, _ in labels],
        [rejected for _, rejected in labels],
        config.model.max_length,
    )
    batch = min(len(pairs), study.train_batch)
    steps = max(study.min_steps, math.ceil(study.epochs * len(pairs) / batch))
    train_reward_model(
        model,
        encoded,
        steps=steps,
        batch_size=batch,
        optimizer=OptimizerSettings.of(config.reward),
        dp=None,
        seed=seed,
    )
    return model


def fit_learning_curve(curve: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least-squares ``(a, b, c)`` of ``acc(n) = a - b * n^(-c)`` through the points."""
    n = np.array([p[0] for p in curve], dtype=float)
    acc = np.array([p[1] for p in curve], dtype=float)
    (a, b, c), _ = curve_fit(
        lambda x, a, b, c: a - b * x ** (-c),
        n,
        acc,
        p0=(acc.max() + 0.02, 1.0, 0.5),
        bounds=([0.0, 0.0, 0.01], [1.0, 100.0, 3.0]),
        maxfev=20_000,
    )
    return float(a), float(b), float(c)


def labels_for_accuracy(fit: tuple[float, float, float], target: float) -> float | None:
    """Labels at which a fitted learning curve reaches ``target`` (None: never)."""
    a, b, c = fit
    if target >= a:
        return None
    return float((b / (a - target)) ** (1.0 / c))


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which a curve first reaches ``target`` (linear between points)."""
    for (n0, a0), (n1, a1) in zip(curve, curve[1:], strict=False):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def run_study(
    out_dir: Path,
    study: StudyConfig | None = None,
    world_config: WorldConfig | None = None,
    cache_dir: Path | None = None,
    pretrain: PretrainConfig | None = None,
) -> dict:
    """Run both campaigns; writes ``labeling_study.json`` and ``labeling_study.png``."""
    study = study or StudyConfig()
    world_config = world_config or WorldConfig()
    cache_dir = cache_dir or Path.home() / ".cache" / "fedrlhf"
    out_dir.mkdir(parents=True, exist_ok=True)
    world = World(world_config)
    base_dir = pretrained_base(world, cache_dir, pretrain)
    config = RunConfig().replace(**{"model.base": str(base_dir)})
    _, tokenizer = load_base(str(base_dir))
    test = build_test_set(world, tokenizer, config.model.max_length)

    campaigns = {RANDOM_CAMPAIGN: 1.0} | {
        f"uncertainty ({f:.0%} random)": f for f in study.random_fractions
    }
    curves: dict[str, list[list[tuple[int, float]]]] = {s: [] for s in campaigns}
    trainings = (
        study.repeats
        * len(campaigns)
        * (1 + math.ceil((study.budget - study.seed_labels) / study.batch))
    )
    progress = Progress(
        TextColumn("labeling study"), BarColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )  # fmt: skip
    task = progress.add_task("", total=trainings)
    progress.start()
    for repeat in range(study.repeats):
        rng = np.random.default_rng([world_config.seed, 7, repeat])
        per_org = math.ceil(study.pool / len(world.organizations))
        pool = [
            pair
            for org in range(len(world.organizations))
            for pair in world.sample_pairs(org, per_org, rng)
        ]
        pool_encoded = encode_pairs(
            tokenizer,
            [p.prompt for p in pool],
            [p.a for p in pool],
            [p.b for p in pool],
            config.model.max_length,
        )
        answers = [world.label(p, rng) for p in pool]  # each pair's label, if asked
        start = rng.choice(len(pool), study.seed_labels, replace=False).tolist()
        for strategy, random_fraction in campaigns.items():
            chosen = list(start)
            pick_rng = np.random.default_rng([world_config.seed, 8, repeat])
            curve = []
            while True:
                model = _train(
                    config,
                    study,
                    [pool[i] for i in chosen],
                    [answers[i] for i in chosen],
                    seed=repeat,
                )
                curve.append((len(chosen), test.accuracy(model)))
                log.info("%s repeat %d: %d labels, accuracy %.4f", strategy, repeat, *curve[-1])
                progress.update(
                    task,
                    advance=1,
                    description=f"{strategy}, repeat {repeat + 1}: {len(chosen)} labels, "
                    f"accuracy {curve[-1][1]:.3f}",
                )
                if len(chosen) >= study.budget:
                    break
                rest = np.array(sorted(set(range(len(pool))) - set(chosen)))
                if strategy == RANDOM_CAMPAIGN:
                    picked = pick_rng.choice(rest, study.batch, replace=False).tolist()
                else:
                    margins = score_pairs(model, pool_encoded).numpy()[rest]
                    queue = order_pairs(margins, random_fraction, 0.0, pick_rng)
                    picked = [int(rest[q.index]) for q in queue[: study.batch]]
                chosen += picked
            curves[strategy].append(curve)
    progress.stop()

    mean = {
        s: [
            (runs[0][k][0], float(np.mean([run[k][1] for run in runs])))
            for k in range(len(runs[0]))
        ]
        for s, runs in curves.items()
    }
    fits = {s: fit_learning_curve(curve) for s, curve in mean.items()}
    a, b, c = fits[RANDOM_CAMPAIGN]
    checkpoints = [n for n, _ in mean[RANDOM_CAMPAIGN]][1:]
    savings = {}
    for strategy in campaigns:
        if strategy == RANDOM_CAMPAIGN:
            continue
        rows = []
        for n in checkpoints:  # labels random selection spends to reach its accuracy at n
            target = a - b * n ** (-c)
            needed = labels_for_accuracy(fits[strategy], target)
            rows.append({"random_labels": n, "accuracy": target, "labels_needed": needed})
        savings[strategy] = rows
    deployed = f"uncertainty ({QueueSettings().random_fraction:.0%} random)"
    at_budget = savings.get(deployed, next(iter(savings.values())))[-1]
    needed = at_budget["labels_needed"]
    target = at_budget["accuracy"]
    report = {
        "study": asdict(study),
        "curves_mean": mean,
        "curves_per_repeat": curves,
        "learning_curve_fits": {s: dict(zip("abc", f, strict=True)) for s, f in fits.items()},
        "labels_needed_for_random_accuracy_at_n": savings,
        "random_accuracy_at_budget": target,
        "uncertainty_labels_to_reach_it": needed,
        "labels_saved": None if needed is None else study.budget - needed,
        "labels_saved_fraction": None if needed is None else 1 - needed / study.budget,
    }
    (out_dir / "labeling_study.json").write_text(json.dumps(report, indent=2))
    shown = needed if needed is not None and needed <= study.budget else None
    _plot(mean, fits, target, shown, out_dir / "labeling_study.png")
    return report


def _plot(mean: dict, fits: dict, target: float, needed: float | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, curve in mean.items():
        line = ax.plot(*zip(*curve, strict=True), "o", label=f"{strategy} selection")[0]
        a, b, c = fits[strategy]
        n = np.linspace(curve[0][0], curve[-1][0], 200)
        ax.plot(n, a - b * n ** (-c), color=line.get_color(), alpha=0.7)
    ax.axhline(target, color="gray", linestyle=":", label="random at full budget")
    if needed is not None:
        ax.axvline(
            needed, color="gray", linestyle="--", label=f"uncertainty reaches it: {needed:.0f}"
        )
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy (expected, vs. true preferences)")
    ax.set_title("Reward-model accuracy per label: which pairs to ask about")
    ax.legend()
    save_figure(fig, path)


def small_study() -> StudyConfig:
    """Settings for tests: a couple of tiny batches."""
    return replace(StudyConfig(), pool=200, seed_labels=20, batch=20, budget=60, repeats=1)
