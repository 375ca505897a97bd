"""Where a client's PPO iteration spends its time and memory, with and without DP.

    python benchmarks/ppo_iteration.py                      # built-in tiny base
    python benchmarks/ppo_iteration.py --model gpt2-small   # GPT-2-small shape, random weights
    python benchmarks/ppo_iteration.py --model /path/to/hf/model

One iteration = generation (sampling the responses), scoring (the reward model on
prompt + response), the reference pass (adapters off), the old-policy pass (log-probs
and values at rollout time) and the PPO update (``ppo_epochs`` passes). Each variant
runs in its own process so that its peak resident memory is its own; the two
alternate, and medians are printed side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch


def run_variant(dp: bool, spec: str, prompts: int, new_tokens: int, iterations: int) -> dict:
    from dp_step import make_base  # this folder is on sys.path when run as a script

    from client.ppo_training import PPOSettings, SamplingSettings, generate_rollouts, ppo_update
    from client.reward_training import DPSettings
    from common.model import build_byte_level_tokenizer, build_reward_model, encode_texts, load_base
    from common.policy_model import add_policy

    torch.manual_seed(0)
    base, model_config = make_base(spec)
    tokenizer = build_byte_level_tokenizer() if spec == "gpt2-small" else load_base(spec)[1]
    reward = build_reward_model(base, model_config, seed=0)
    policy = add_policy(reward.lm, model_config, seed=1)
    for name, p in policy.named_parameters():
        p.requires_grad_(".policy." in name or name.startswith("value_head"))
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    timings: dict[str, list[float]] = {
        k: [] for k in ("generation", "scoring", "old+reference passes", "update", "iteration")
    }

    def score(prompt_texts, responses):
        start = time.perf_counter()
        with torch.no_grad():
            ids, mask = encode_texts(tokenizer, list(prompt_texts), list(responses), 128)
            scores = reward(ids, mask)
        timings["scoring"].append(time.perf_counter() - start)
        return scores

    texts = [f"Question {k}: how should I plan my week?" for k in range(prompts)]
    sampling = SamplingSettings(max_new_tokens=new_tokens)
    dp_settings = DPSettings(1.0, 1.0) if dp else None
    original_generate = policy.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = original_generate(*args, **kwargs)
        timings["generation"].append(time.perf_counter() - start)
        return out

    policy.generate = timed_generate  # type: ignore[method-assign]
    for i in range(iterations + 1):  # the first iteration warms caches
        start = time.perf_counter()
        rollouts = generate_rollouts(policy, tokenizer, texts, score, sampling, seed=i)
        rollout_seconds = time.perf_counter() - start
        update_start = time.perf_counter()
        ppo_update(
            policy, rollouts, 0.05, PPOSettings(ppo_epochs=4), optimizer,
            dp=dp_settings, expected_batch_size=prompts, seed=i,
        )  # fmt: skip
        timings["update"].append(time.perf_counter() - update_start)
        timings["old+reference passes"].append(
            rollout_seconds - timings["generation"][-1] - timings["scoring"][-1]
        )
        timings["iteration"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v[1:]) for k, v in timings.items()}
    medians["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return medians


def _child(queue: mp.Queue, *args: object) -> None:
    queue.put(run_variant(*args))  # type: ignore[arg-type]


def in_process(*args: object) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--prompts", type=int, default=16, help="rollouts per iteration")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    plain = in_process(False, args.model, args.prompts, args.new_tokens, args.iterations)
    private = in_process(True, args.model, args.prompts, args.new_tokens, args.iterations)
    print(
        f"model {args.model}, {args.prompts} rollouts x {args.new_tokens} new tokens, "
        f"4 PPO epochs, torch threads {torch.get_num_threads()} (medians over "
        f"{args.iterations} iterations)"
    )
    print(f"{'phase':<24}{'non-DP':>12}{'DP':>12}{'DP/non-DP':>12}")
    for key in plain:
        unit = " MB" if key == "peak_rss_mb" else " s"
        p, d = plain[key], private[key]
        print(f"{key:<24}{p:>10.3f}{unit}{d:>10.3f}{unit}{d / p if p else float('nan'):>12.2f}")


if __name__ == "__main__":
    main()
