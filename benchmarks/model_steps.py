"""A client's training steps on a real model shape, DP vs non-DP side by side.

    python benchmarks/model_steps.py                                  # GPT-2 small, CPU
    python benchmarks/model_steps.py --model qwen2.5-0.5b --device cuda --dtype bfloat16
    python benchmarks/model_steps.py --model llama-3.2-1b --device cuda --dtype bfloat16
    python benchmarks/model_steps.py --model /path/to/checkpoint --device cuda

Presets (``gpt2-small``, ``qwen2.5-0.5b``, ``llama-3.2-1b``) are the published shapes
with random weights (:mod:`simulations.architectures`), so nothing is downloaded. The
adapters are the run config's defaults (reward: LoRA rank 4 on the architecture's
default targets; policy: rank 4 on all linear layers). Measured, in one process, with
DP and non-DP repetitions alternating so that machine noise hits both alike:

* reward step: Bradley-Terry on ``--batch`` comparisons of ``--length`` tokens;
* DPO step: the same comparisons, policy and reference passes;
* PPO iteration by phase: generation, scoring, old-policy and reference passes (the
  same with and without DP), and the update (``ppo-epochs`` passes, where DP adds
  per-rollout gradients, clipping and noise).

For each: median time, DP/non-DP ratio, tokens per second, and peak memory (CUDA:
``max_memory_allocated``; CPU: peak resident memory sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.dpo_training import DPOBatch, dpo_batch_loss
from client.ppo_training import PPOSettings, SamplingSettings, generate_rollouts, ppo_update
from client.reward_training import DPSettings, _pair_loss, finish_training
from common.config import RunConfig
from common.hardware import noise_generator
from common.model import EncodedPairs, build_reward_model, load_base, score_responses, train_only
from common.policy_model import POLICY_ADAPTER, add_policy
from simulations.architectures import PRESETS, build_preset

DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)


@dataclass
class Measured:
    seconds: list[float]
    peak_bytes: int
    tokens: int
    """Tokens one repetition processes (for tokens per second)."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @contextmanager
    def watch(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        process, done = psutil.Process(), threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_pairs(vocab: int, batch: int, length: int, seed: int) -> EncodedPairs:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    return EncodedPairs(ids[0], mask, ids[1], mask.clone())


def timed_training_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    loss_of: Callable[[torch.nn.Module], torch.Tensor],
    dp: bool,
    batch: int,
    repeats: int,
    memory: PeakMemory,
    device: torch.device,
) -> list[float]:
    """``repeats`` optimizer steps (after one warm-up), as the trainers take them."""
    optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    trained = model
    if dp:
        trained = GradSampleModule(model, loss_reduction="mean")
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=DP.noise_multiplier,
            max_grad_norm=DP.max_grad_norm,
            expected_batch_size=batch,
            generator=noise_generator(device, 0),
        )
    model.train()
    times = []
    try:
        for i in range(repeats + 1):
            with memory.watch():
                synchronize(device)
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss_of(trained).backward()
                optimizer.step()
                synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    finally:
        finish_training(model, trained, params)
    return times


def measure_ppo(policy, reward, tokenizer, config, args, dp: bool, record) -> None:  # noqa: ANN001
    """PPO iterations by phase: rollouts (the same work with or without DP: generation,
    scoring, old-policy and reference passes), then the update."""
    device = policy.device
    prompts = [f"Question {k}: how should I plan my week?" for k in range(args.batch)]
    sampling = SamplingSettings(max_new_tokens=args.new_tokens)
    ppo = PPOSettings(ppo_epochs=config.policy.ppo_epochs)
    train_only(policy, POLICY_ADAPTER, ("value_head.",))
    params = [p for p in policy.parameters() if p.requires_grad]
    phases: dict[str, float] = {}
    memory = PeakMemory(device)

    def score(prompt_texts, responses):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        scores = score_responses(
            reward, tokenizer, list(prompt_texts), list(responses), config.model.max_length
        )
        phases["PPO scoring"] = time.perf_counter() - start
        return scores

    generate = policy.generate

    def timed_generate(*a, **k):  # noqa: ANN002, ANN003, ANN202
        synchronize(device)
        start = time.perf_counter()
        out = generate(*a, **k)
        synchronize(device)
        phases["PPO generation"] = time.perf_counter() - start
        return out

    policy.generate = timed_generate
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    try:
        for i in range(args.repeats + 1):
            with memory.watch():
                start = time.perf_counter()
                rollouts = generate_rollouts(policy, tokenizer, prompts, score, sampling, seed=i)
                synchronize(device)
                rollout_end = time.perf_counter()
                ppo_update(
                    policy, rollouts, 0.05, ppo, optimizer, dp=DP if dp else None,
                    expected_batch_size=args.batch, seed=i,
                )  # fmt: skip
                synchronize(device)
                end = time.perf_counter()
            if i == 0:
                continue  # warm-up
            phases["PPO old+reference passes"] = (
                rollout_end - start - phases["PPO generation"] - phases["PPO scoring"]
            )
            phases["PPO update"] = end - rollout_end
            phases["PPO iteration"] = end - start
            tokens = int(rollouts.mask.sum())
            for name, value in phases.items():
                record(name, dp, [value], memory, tokens)
    finally:
        del policy.generate  # back to the class's method


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2-small", help=f"{', '.join(PRESETS)}, or a path")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, auto")
    parser.add_argument("--batch", type=int, default=8, help="comparisons (or prompts) per step")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32, help="PPO response tokens")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating DP/non-DP rounds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path = args.model
        if args.model in PRESETS:
            print(f"building {args.model} (random weights, published shape) ...", flush=True)
            path = str(build_preset(args.model, Path(scratch) / args.model))
        config = RunConfig().replace(
            **{"model.base": path, "model.device": args.device, "model.dtype": args.dtype}
        )
        load_start = time.perf_counter()
        base, tokenizer = load_base(path, config=config.model)
        load_seconds = time.perf_counter() - load_start
    device = base.device
    reward = build_reward_model(base, config.model)
    policy = add_policy(reward.lm, config.policy_model)
    vocab = min(base.config.vocab_size, len(tokenizer))
    pairs = random_pairs(vocab, args.batch, args.length, seed=0)
    dpo = DPOBatch(
        pairs, torch.zeros(args.batch, dtype=torch.long), torch.zeros(args.batch, dtype=torch.long)
    )
    dpo = dpo.rows(torch.arange(args.batch), device)
    step_tokens = 2 * args.batch * args.length

    def reward_loss(model: torch.nn.Module) -> torch.Tensor:
        fields = (pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask)
        return _pair_loss(model, fields)

    def dpo_loss_(model: torch.nn.Module) -> torch.Tensor:
        return dpo_batch_loss(model, policy, dpo, beta=0.1)

    results: dict[tuple[str, bool], Measured] = {}

    def record(name: str, dp: bool, seconds: list[float], memory: PeakMemory, tokens: int) -> None:
        entry = results.setdefault((name, dp), Measured([], 0, tokens))
        entry.seconds += seconds
        entry.peak_bytes = max(entry.peak_bytes, memory.peak)

    for round_ in range(args.rounds):
        for dp in (False, True) if round_ % 2 == 0 else (True, False):  # no side always first
            memory = PeakMemory(device)
            train_only(reward, "reward", ("head.",))
            params = [p for p in reward.parameters() if p.requires_grad]
            seconds = timed_training_steps(
                reward, params, reward_loss, dp, args.batch, args.repeats, memory, device
            )
            record("reward step", dp, seconds, memory, step_tokens)

            memory = PeakMemory(device)
            train_only(policy, POLICY_ADAPTER)
            params = [p for p in policy.parameters() if p.requires_grad]
            seconds = timed_training_steps(
                policy, params, dpo_loss_, dp, args.batch, args.repeats, memory, device
            )
            record("DPO step", dp, seconds, memory, step_tokens)

            measure_ppo(policy, reward, tokenizer, config, args, dp, record)
        print(f"round {round_ + 1}/{args.rounds} measured", flush=True)

    parameters = sum(p.numel() for p in base.parameters())
    print(
        f"\nmodel {args.model} ({parameters / 1e6:.0f}M parameters), {device} {base.dtype}, "
        f"loaded in {load_seconds:.1f} s; batch {args.batch} x {args.length} tokens, "
        f"{args.new_tokens} new tokens, {config.policy.ppo_epochs} PPO epochs; medians of "
        f"{args.rounds * args.repeats} repetitions; torch threads {torch.get_num_threads()}"
    )
    memory_kind = "CUDA peak allocated" if device.type == "cuda" else "peak RSS"
    header = (
        f"| phase | non-DP ms | DP ms | DP / non-DP | DP tokens/s | {memory_kind} non-DP MB "
        f"| DP MB | DP / non-DP memory |"
    )
    print(header)
    print("|" + "---|" * 8)
    names = dict.fromkeys(name for name, _ in results)
    for name in names:
        plain, private = results[name, False], results[name, True]
        print(
            f"| {name} | {plain.median * 1e3:.1f} | {private.median * 1e3:.1f} | "
            f"{private.median / plain.median:.2f} | {private.tokens / private.median:.0f} | "
            f"{plain.peak_bytes / 2**20:.0f} | {private.peak_bytes / 2**20:.0f} | "
            f"{private.peak_bytes / max(plain.peak_bytes, 1):.2f} |"
        )


if __name__ == "__main__":
    main()
