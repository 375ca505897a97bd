"""Anchor: our central non-DP reward trainer against TRL's RewardTrainer, side by side.

Same English preference data (:mod:`simulations.english_preferences`: the organizations'
training comparisons pooled, the shared test file held out), same base model and
tokenizer, both without DP. Ours is exactly the simulation's "centralized, non-DP"
baseline (:func:`simulations.baselines.train_non_dp`: the run config's model and adapter,
its non-DP schedule);
TRL's is ``RewardTrainer`` with LoRA on the same modules, at the settings its docs use
for small models. A federation can only be judged against a baseline that is itself
competitive: this prints both accuracies and their difference.

TRL is needed for this benchmark only: ``.venv/bin/pip install trl``.

    .venv/bin/python benchmarks/reward_anchor.py [--base builtin:english] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from client.store import NewComparison
from common.config import RunConfig
from common.model import encode_texts, load_base, resolve_base
from common.operator_logging import configure_operator_logging
from simulations.baselines import NON_DP_SCHEDULE, labeled_test_set, train_non_dp
from simulations.english_preferences import EnglishPreferences, EnglishPreferencesConfig


def _comparisons(rows: list[dict]) -> list[NewComparison]:
    return [NewComparison(r["prompt"], r["chosen"], r["rejected"], r["annotator"]) for r in rows]


def ours(config: RunConfig, train: list[NewComparison], test: list[NewComparison]) -> float:
    _, tokenizer = load_base(config.model.base)
    model = train_non_dp(config, train, seed=1)
    return labeled_test_set(test, tokenizer, config.model.max_length).accuracy(model)


def trl_reward_trainer(
    config: RunConfig,
    train: list[NewComparison],
    test: list[NewComparison],
    args: argparse.Namespace,
) -> float:
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(config.model.base)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model.base, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_list(
        [{"prompt": c.prompt + "\n", "chosen": c.chosen, "rejected": c.rejected} for c in train]
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.trl_rank,
        lora_alpha=2 * args.trl_rank,
        target_modules=config.model.lora_targets.split(","),
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(
                output_dir=out,
                num_train_epochs=args.trl_epochs,
                per_device_train_batch_size=32,
                learning_rate=args.trl_lr,
                max_length=config.model.max_length,
                logging_steps=1000,
                save_strategy="no",
                report_to=[],
                use_cpu=not torch.cuda.is_available(),
                seed=1,
                disable_tqdm=True,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.train()
        scorer = trainer.model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(test), 128):
            batch = test[start : start + 128]
            prompts = [c.prompt for c in batch]
            device = next(scorer.parameters()).device
            scores = []
            for responses in ([c.chosen for c in batch], [c.rejected for c in batch]):
                ids, mask = encode_texts(tokenizer, prompts, responses, config.model.max_length)
                scores.append(
                    scorer(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                )
            margins.append((scores[0] - scores[1]).squeeze(-1).cpu())
    margin = torch.cat(margins).numpy()
    return float(np.mean(margin > 0) + 0.5 * np.mean(margin == 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=RunConfig().model.base)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--trl-rank", type=int, default=8)
    parser.add_argument("--trl-lr", type=float, default=1e-3)
    parser.add_argument("--trl-epochs", type=float, default=3.0)
    args = parser.parse_args()
    configure_operator_logging()
    config = RunConfig().replace(**{"model.base": resolve_base(args.base)})
    print(
        f"base {args.base}; ours: LoRA r={config.model.lora_rank} on "
        f"{config.model.lora_targets}, {NON_DP_SCHEDULE.optimizer} lr "
        f"{NON_DP_SCHEDULE.learning_rate:g}, batch {NON_DP_SCHEDULE.batch_size}, "
        f"{NON_DP_SCHEDULE.epochs:g} epochs; TRL RewardTrainer: "
        f"LoRA r={args.trl_rank}, AdamW lr {args.trl_lr:g}, {args.trl_epochs:g} epochs, batch 32"
    )
    print(
        f"{'seed':>4} {'train':>6} {'test':>5} {'ours':>7} {'TRL':>7} {'ours-TRL':>9} "
        f"{'ours s':>7} {'TRL s':>6}"
    )
    gaps = []
    for seed in args.seeds:
        data = EnglishPreferences(EnglishPreferencesConfig(seed=seed))
        train = _comparisons([r for o in range(3) for r in data.organization_rows(o)])
        test = _comparisons(data.test_rows())
        started = time.perf_counter()
        our_accuracy = ours(config, train, test)
        our_seconds = time.perf_counter() - started
        started = time.perf_counter()
        trl_accuracy = trl_reward_trainer(config, train, test, args)
        trl_seconds = time.perf_counter() - started
        gaps.append(our_accuracy - trl_accuracy)
        print(
            f"{seed:>4} {len(train):>6} {len(test):>5} {our_accuracy:>7.4f} {trl_accuracy:>7.4f} "
            f"{gaps[-1]:>+9.4f} {our_seconds:>7.0f} {trl_seconds:>6.0f}"
        )
    print(f"mean ours - TRL: {np.mean(gaps):+.4f} (target: >= -0.02)")


if __name__ == "__main__":
    main()
