"""DP training step vs non-DP step on the same batch, measured side by side.

    python benchmarks/dp_step.py                      # built-in tiny base
    python benchmarks/dp_step.py --model gpt2-small   # GPT-2-small shape (124M), random weights
    python benchmarks/dp_step.py --model /path/to/hf/model

Both variants run the reward model's real training step (two forward passes, one
per side of the comparison, Bradley-Terry loss, Adam); the DP one adds Opacus
per-sample gradients (hooks), clipping and noise. Repetitions alternate between the
two so that machine noise hits both alike; the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from opacus import PrivacyEngine
from transformers import GPT2Config, GPT2LMHeadModel

from client.reward_training import _pair_loss
from common.config import ModelConfig
from common.model import build_byte_level_tokenizer, build_reward_model, load_base


def make_base(spec: str):
    if spec == "gpt2-small":
        tokenizer = build_byte_level_tokenizer()
        config = GPT2Config(  # 124M-shaped body on the byte-level tokenizer
            vocab_size=len(tokenizer),
            n_positions=256,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
        model.requires_grad_(False)
        return model, ModelConfig(lora_targets="c_attn", lora_rank=8)
    model, _ = load_base(spec)
    return model, ModelConfig()


def step_times(dp: bool, spec: str, batch: int, length: int, repeats: int) -> list[float]:
    base, model_config = make_base(spec)
    model = build_reward_model(base, model_config, seed=0)
    model.train()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    data = (ids, mask, ids.flip(1), mask)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trained = model
    if dp:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*data), batch_size=batch
        )
        trained, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _pair_loss(trained, data).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step warms caches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="builtin:tiny", help="builtin:tiny, gpt2-small, or a model path"
    )
    parser.add_argument("--batch", type=int, default=16, help="comparisons per step")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    parser.add_argument("--repeats", type=int, default=6, help="steps per round")
    args = parser.parse_args()
    plain, private = [], []
    for _ in range(args.rounds):
        plain += step_times(False, args.model, args.batch, args.length, args.repeats)
        private += step_times(True, args.model, args.batch, args.length, args.repeats)
    p, d = statistics.median(plain), statistics.median(private)
    print(
        f"model {args.model}, {args.batch} comparisons x {args.length} tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"non-DP step: median {p * 1000:.1f} ms over {len(plain)} steps")
    print(
        f"DP step    : median {d * 1000:.1f} ms over {len(private)} steps (Opacus hooks, clip + noise)"
    )
    print(
        f"DP / non-DP step time ratio: {d / p:.3f}  (target <= 1.1 at GPT-2-small size, <= 1.5 overall)"
    )


if __name__ == "__main__":
    main()
