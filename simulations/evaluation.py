"""Score any checkpoint on data: reward adapters on comparisons, policies on prompts.

Used by ``fedrlhf evaluate`` and by the simulation's report.

* A reward adapter on labeled comparisons: accuracy (ties count half), mean margin
  ``r(chosen) - r(rejected)``, the Bradley-Terry log loss, and calibration: the model's
  ``sigmoid(margin)`` is its probability that the chosen response wins; reliability bins
  of the predicted winner's probability against how often it did win, and the
  expected calibration error (ECE) over them.
* A policy adapter on prompts: samples from the reference (the base, adapters off) and
  from the policy, each scored by a reward adapter; the policy's win rate over the
  reference (pairs of samples for the same prompt, by reward score), mean scores, and
  the policy's KL to the reference on its own samples (summed over response tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from client.ppo_training import SamplingSettings, generate_rollouts
from client.store import NewComparison
from common.config import ModelConfig
from common.model import (
    RewardModel,
    build_reward_model,
    encode_pairs,
    load_base,
    load_reward_model,
    score_pairs,
    score_responses,
)
from common.policy_model import load_policy
from common.ppo import kl_per_token

RELIABILITY_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class RewardEvaluation:
    comparisons: int
    accuracy: float
    mean_margin: float
    log_loss: float
    expected_calibration_error: float
    reliability: list[ReliabilityBin]

    def to_dict(self) -> dict:
        return asdict(self)


def reward_metrics(margins: np.ndarray) -> RewardEvaluation:
    """The figures of a reward model from its margins ``r(chosen) - r(rejected)``."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.size == 0:
        raise ValueError("no comparisons to evaluate")
    correct = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    p_chosen = 1.0 / (1.0 + np.exp(-margins))
    confidence = np.maximum(p_chosen, 1.0 - p_chosen)
    bins = []
    ece = 0.0
    for i, (low, high) in enumerate(zip(RELIABILITY_EDGES, RELIABILITY_EDGES[1:], strict=False)):
        last = i == len(RELIABILITY_EDGES) - 2
        inside = (confidence >= low) & ((confidence <= high) if last else (confidence < high))
        n = int(inside.sum())
        if n:
            conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += n / margins.size * abs(acc - conf)
            bins.append(ReliabilityBin(low, high, n, conf, acc))
        else:
            bins.append(ReliabilityBin(low, high, 0, None, None))
    return RewardEvaluation(
        comparisons=int(margins.size),
        accuracy=float(correct.mean()),
        mean_margin=float(margins.mean()),
        log_loss=float(np.logaddexp(0.0, -margins).mean()),
        expected_calibration_error=float(ece),
        reliability=bins,
    )


def reward_margins(
    model: RewardModel,
    tokenizer,
    comparisons: Sequence[NewComparison],
    max_length: int,  # noqa: ANN001
) -> np.ndarray:
    pairs = encode_pairs(
        tokenizer,
        [c.prompt for c in comparisons],
        [c.chosen for c in comparisons],
        [c.rejected for c in comparisons],
        max_length,
    )
    return score_pairs(model, pairs).numpy()


def base_of_checkpoint(adapter_dir: Path) -> str | None:
    """The base a server checkpoint's adapter was trained on: ``model.base`` in the run's
    ``run_config.json`` (``RUN/checkpoints/NAME/ADAPTER``), else PEFT's record of it."""
    run_config = adapter_dir.resolve().parents[2] / "run_config.json"
    if run_config.exists():
        return json.loads(run_config.read_text()).get("model.base")
    peft_config = adapter_dir / "adapter_config.json"
    if peft_config.exists():
        return json.loads(peft_config.read_text()).get("base_model_name_or_path") or None
    return None


def max_length_of_checkpoint(adapter_dir: Path, default: int) -> int:
    run_config = adapter_dir.resolve().parents[2] / "run_config.json"
    if run_config.exists():
        return int(json.loads(run_config.read_text()).get("model.max-length", default))
    return default


def evaluate_reward_adapter(
    base: str,
    reward_dir: Path,
    comparisons: Sequence[NewComparison],
    max_length: int,
    model_config: ModelConfig | None = None,
) -> RewardEvaluation:
    model, tokenizer = load_base(base, config=model_config)
    reward = load_reward_model(model, reward_dir)
    return reward_metrics(reward_margins(reward, tokenizer, comparisons, max_length))


@dataclass(frozen=True)
class PolicyEvaluation:
    prompt_count: int
    samples_per_prompt: int
    kl_to_reference: float
    """Mean over the policy's samples of the summed per-token log-ratio (k1)."""
    policy_ended_share: float
    win_rate: float | None
    """Share of (policy, reference) sample pairs the reward model scores higher for the
    policy (ties half); None without a reward adapter."""
    policy_mean_score: float | None
    reference_mean_score: float | None
    examples: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_policy_adapter(
    base: str,
    policy_dir: Path,
    prompts: Sequence[str],
    reward_dir: Path | None,
    sampling: SamplingSettings,
    max_length: int,
    samples_per_prompt: int = 2,
    seed: int = 0,
    examples: int = 3,
    model_config: ModelConfig | None = None,
) -> PolicyEvaluation:
    """Reference and policy samples for ``prompts``, judged by the reward adapter."""
    model, tokenizer = load_base(base, config=model_config)
    if reward_dir is not None:
        reward = load_reward_model(model, reward_dir)
    else:  # a fresh reward adapter only to hold the base in a PEFT model; never scores
        reward = build_reward_model(model, ModelConfig())
    policy = load_policy(reward.lm, policy_dir)
    asked = [p for p in prompts for _ in range(samples_per_prompt)]

    def score(p: Sequence[str], r: Sequence[str]) -> torch.Tensor:
        if reward_dir is None:
            return torch.zeros(len(p))
        return score_responses(reward, tokenizer, list(p), list(r), max_length)

    ours = generate_rollouts(policy, tokenizer, asked, score, sampling, seed)
    theirs = generate_rollouts(policy, tokenizer, asked, score, sampling, seed, reference=True)
    kl = kl_per_token(ours.logp_old, ours.logp_ref, "k1") * ours.response_mask
    win = None
    if reward_dir is not None:
        gap = (ours.scores - theirs.scores).cpu().numpy()
        win = float(np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0)).mean())
    return PolicyEvaluation(
        prompt_count=len(prompts),
        samples_per_prompt=samples_per_prompt,
        kl_to_reference=float(kl.sum(dim=1).mean()),
        policy_ended_share=float(ours.ended.float().mean()),
        win_rate=win,
        policy_mean_score=float(ours.scores.mean()) if reward_dir is not None else None,
        reference_mean_score=float(theirs.scores.mean()) if reward_dir is not None else None,
        examples=[
            {"prompt": p, "reference": r, "policy": q}
            for p, r, q in list(zip(asked, theirs.responses, ours.responses, strict=True))[
                :: max(1, samples_per_prompt)
            ][:examples]
        ],
    )
