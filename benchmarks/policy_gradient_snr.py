"""What DP clipping keeps of the policy gradient: per-prompt RLOO gradients at the
reference, side by side for several clip norms and adapter modules.

Under DP-SGD the noise on a batch mean is ``sigma * C / B`` per coordinate whatever the
gradients are, so what a clip norm C buys is the norm of the clipped mean divided by C
(the signal in units of the noise's scale). This loads a finished simulation run's
reward model (its last reward checkpoint), samples ``samples-per-prompt`` responses
from the reference for one organization's prompts, and prints

- the per-prompt gradient norms (Opacus per-response gradients averaged per prompt,
  exactly as the policy round computes them, before clipping);
- for each C: |clipped mean| / C, and its cosine with the unclipped mean;
- per adapter module: the signal energy (|mean|^2 less its sampling variance) per
  parameter, against which DP noise, the same per parameter, is paid.

    .venv/bin/python benchmarks/policy_gradient_snr.py runs/simulation [--prompts 256] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule

from client.policy_round import cached_policy_model
from client.ppo_training import (
    PPOSettings,
    SamplingSettings,
    advantages_of,
    generate_rollouts,
    group_grad_samples,
    repeat_prompts,
)
from client.store import PreferenceStore
from common.config import RunConfig
from common.model import score_responses, train_only
from common.policy_model import POLICY_ADAPTER, token_logprobs
from common.ppo import clipped_policy_loss, kl_per_token
from server.checkpoints import RunDirectory

CLIP_NORMS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def per_prompt_gradients(run_dir: Path, prompts: int, k: int, seed: int = 0):  # noqa: ANN201
    flat = json.loads((run_dir / "run_config.json").read_text())
    config = RunConfig.from_flower({**flat, "policy.samples-per-prompt": k})
    reward, policy, tokenizer = cached_policy_model(config.model, config.policy_model)
    run = RunDirectory(run_dir)
    last_reward = sorted(run.checkpoints.glob("reward-round-*"))[-1]
    reward.load_trainable_state(run.load(last_reward).reward)
    store = sorted((run_dir / "stores").glob("org-*.sqlite"))[0]
    with PreferenceStore(store) as s:
        texts = s.prompts()[:prompts]

    def score(p, r):  # noqa: ANN001, ANN202
        return score_responses(reward, tokenizer, p, r, config.model.max_length)

    sampling = SamplingSettings.of(config.policy)
    rollouts = generate_rollouts(policy, tokenizer, repeat_prompts(texts, k), score, sampling, seed)
    settings = PPOSettings.of(config.policy)
    kl = kl_per_token(rollouts.logp_old, rollouts.logp_ref, settings.kl_estimator)
    advantages, _ = advantages_of(rollouts, kl * rollouts.response_mask, 0.1, settings)
    train_only(policy, POLICY_ADAPTER)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    model = GradSampleModule(policy, loss_reduction="mean")
    policy.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits, _ = model(rollouts.ids, rollouts.mask, rollouts.positions)
        logp = token_logprobs(logits, rollouts.ids)
        loss = clipped_policy_loss(
            logp, rollouts.logp_old, advantages, rollouts.response_mask, settings.clip_range,
            per_sequence=True,
        ).loss  # fmt: skip
        loss.backward()
    group_grad_samples([p for _, p in named], k)
    return {n: p.grad_sample.flatten(1).detach() for n, p in named}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    args = parser.parse_args()
    grads = per_prompt_gradients(args.run_dir, args.prompts, args.k)
    g = torch.cat(list(grads.values()), dim=1)
    norms = g.norm(dim=1)
    print(f"{len(g)} prompts x {args.k} responses, {g.shape[1]} adapter parameters")
    quantiles = np.quantile(norms.numpy(), [0.1, 0.5, 0.9])
    print("per-prompt gradient norm, 10/50/90th percentile:", np.round(quantiles, 3))
    mean = g.mean(0)
    print(f"{'clip C':>8} {'|clipped mean|/C':>17} {'cosine to mean':>15}")
    for clip in CLIP_NORMS:
        clipped = (g * (clip / norms.clamp(min=clip)).unsqueeze(1)).mean(0)
        cosine = torch.nn.functional.cosine_similarity(clipped, mean, dim=0)
        print(f"{clip:8.2f} {clipped.norm() / clip:17.3f} {cosine:15.3f}")
    modules: dict[str, list[float]] = {}
    for name, gs in grads.items():
        found = re.search(r"\.(\w+)\.lora_([AB])\.", name)
        key = f"{found.group(1)} lora_{found.group(2)}" if found else name
        signal = float(gs.mean(0).pow(2).sum() - gs.var(0).sum() / len(gs))
        entry = modules.setdefault(key, [0.0, 0])
        entry[0] += signal
        entry[1] += gs.shape[1]
    print(f"{'module':>18} {'params':>7} {'signal^2':>10} {'per param':>10}")
    for key, (signal, count) in sorted(modules.items()):
        print(f"{key:>18} {count:7d} {signal:10.2e} {signal / count:10.2e}")


if __name__ == "__main__":
    main()
