"""``fedrlhf evaluate``: score any reward or policy checkpoint on a file.

``--reward DIR --data FILE``: accuracy, mean margin, log loss and calibration of a reward
adapter on labeled comparisons. ``--policy DIR --prompts FILE [--reward DIR]``: samples
from the reference and the policy, the reward model's win rate of policy over
reference, mean scores, KL to the reference. A table on the terminal, JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.importers import read_comparisons, read_prompts
from client.ppo_training import SamplingSettings
from common.config import ConfigError, ModelConfig
from fedrlhf.hardware_options import add_hardware_options, model_config_of

console = Console()


def _base(args: argparse.Namespace, adapter_dir: Path) -> str:
    from simulations.evaluation import base_of_checkpoint

    base = args.base or base_of_checkpoint(adapter_dir)
    if not base:
        raise ConfigError(
            f"{adapter_dir}: cannot tell which base model it was trained on; pass --base"
        )
    return base


def _adapter(path: str, what: str) -> Path:
    adapter = Path(path)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter}: no adapter_config.json (expected a {what} adapter directory, "
            f"e.g. RUN/checkpoints/{what}-round-0005/{what})"
        )
    return adapter


def _evaluate(args: argparse.Namespace) -> int:
    from simulations.evaluation import (
        evaluate_policy_adapter,
        evaluate_reward_adapter,
        max_length_of_checkpoint,
    )

    if bool(args.policy) == bool(args.data):
        raise ConfigError("evaluate: give --reward DIR --data FILE, or --policy DIR --prompts FILE")
    result: dict = {}
    if args.data:
        if not args.reward:
            raise ConfigError("evaluate --data needs --reward DIR")
        reward = _adapter(args.reward, "reward")
        comparisons = read_comparisons(args.data)
        max_length = max_length_of_checkpoint(reward, ModelConfig().max_length)
        evaluation = evaluate_reward_adapter(
            _base(args, reward), reward, comparisons, max_length, model_config_of(args)
        )
        result = {"reward": str(reward), "data": args.data, **evaluation.to_dict()}
        _print_reward(result)
    else:
        if not args.prompts:
            raise ConfigError("evaluate --policy needs --prompts FILE")
        policy = _adapter(args.policy, "policy")
        reward = _adapter(args.reward, "reward") if args.reward else None
        max_length = max_length_of_checkpoint(policy, ModelConfig().max_length)
        evaluation = evaluate_policy_adapter(
            _base(args, policy),
            policy,
            read_prompts(args.prompts),
            reward,
            SamplingSettings(max_new_tokens=args.max_new_tokens),
            max_length,
            samples_per_prompt=args.samples,
            seed=args.seed,
            model_config=model_config_of(args),
        )
        result = {
            "policy": str(policy),
            "reward": str(reward) if reward else None,
            "prompts": args.prompts,
            **evaluation.to_dict(),
        }
        _print_policy(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        console.print(f"written to {args.json}")
    return 0


def _print_reward(result: dict) -> None:
    table = Table(title=f"reward adapter {result['reward']} on {result['data']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("comparisons", str(result["comparisons"]))
    table.add_row("accuracy (ties count half)", f"{result['accuracy']:.4f}")
    table.add_row("mean margin r(chosen) - r(rejected)", f"{result['mean_margin']:.4f}")
    table.add_row("log loss (Bradley-Terry)", f"{result['log_loss']:.4f}")
    table.add_row("expected calibration error", f"{result['expected_calibration_error']:.4f}")
    console.print(table)
    bins = Table(title="reliability: the predicted winner's probability vs how often it won")
    for column in ("confidence", "comparisons", "mean confidence", "accuracy"):
        bins.add_column(column, justify="right")
    for b in result["reliability"]:
        bins.add_row(
            f"{b['low']:.1f}-{b['high']:.1f}",
            str(b["count"]),
            "-" if b["mean_confidence"] is None else f"{b['mean_confidence']:.3f}",
            "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}",
        )
    console.print(bins)


def _print_policy(result: dict) -> None:
    table = Table(title=f"policy adapter {result['policy']} on {result['prompts']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("prompts x samples", f"{result['prompt_count']} x {result['samples_per_prompt']}")
    table.add_row("KL to the reference (nats per response)", f"{result['kl_to_reference']:.4f}")
    table.add_row("policy samples that ended (EOS)", f"{result['policy_ended_share']:.3f}")
    if result["win_rate"] is not None:
        table.add_row("reward-model win rate over the reference", f"{result['win_rate']:.3f}")
        table.add_row("mean reward score: policy", f"{result['policy_mean_score']:.4f}")
        table.add_row("mean reward score: reference", f"{result['reference_mean_score']:.4f}")
    console.print(table)
    for example in result["examples"]:
        console.print(f"[bold]{example['prompt']}[/bold]")
        console.print(f"  reference: {example['reference']}")
        console.print(f"  policy:    {example['policy']}")


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """Register ``fedrlhf evaluate`` on the ``fedrlhf`` parser."""
    ev = sub.add_parser("evaluate", help="score a reward or policy checkpoint on data")
    ev.add_argument("--reward", help="a reward adapter directory (checkpoints/.../reward)")
    ev.add_argument("--data", help="with --reward: labeled comparisons (any import format)")
    ev.add_argument("--policy", help="a policy adapter directory (checkpoints/.../policy)")
    ev.add_argument(
        "--prompts", help="with --policy: prompts, JSONL with 'prompt' or one per line (.txt)"
    )
    ev.add_argument("--base", help="the base model (default: the checkpoint's run's model.base)")
    ev.add_argument("--samples", type=int, default=2, help="--policy: samples per prompt")
    ev.add_argument("--max-new-tokens", type=int, default=48, help="--policy: response length")
    ev.add_argument("--seed", type=int, default=0, help="--policy: sampling seed")
    ev.add_argument("--json", help="also write the figures to this JSON file")
    add_hardware_options(ev)
    ev.set_defaults(func=_evaluate)
