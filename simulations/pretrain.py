"""Pretrain the built-in tiny base on the world's text, once, and cache it.

The base stands in for an open pretrained LM: it has read the world's prompts and
responses (sampled without regard to anyone's preferences) and knows the grammar,
but not what any organization prefers. It is saved with ``save_pretrained`` and
from then on loaded like any other base, by path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from common.model import build_byte_level_tokenizer, build_tiny_base
from simulations.world import World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    corpus_size: int = 30_000
    vocab_size: int = 512
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def cache_key(world: World, config: PretrainConfig) -> str:
    text = world.config.text_fingerprint() + json.dumps(asdict(config), sort_keys=True)
    return "base-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrained_base(world: World, cache_dir: Path, config: PretrainConfig | None = None) -> Path:
    """Directory of the pretrained base for ``world``, training it if not cached."""
    config = config or PretrainConfig()
    target = Path(cache_dir) / cache_key(world, config)
    if (target / "config.json").exists():
        log.info("base model: cached at %s", target)
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    train_base(world, config, tmp)
    tmp.rename(target)
    return target


def train_base(world: World, config: PretrainConfig, out_dir: Path) -> None:
    """Train tokenizer and tiny causal LM on the world's corpus; save both to ``out_dir``."""
    corpus = world.corpus(config.corpus_size, seed=config.seed)
    tokenizer = build_byte_level_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_tiny_base(tokenizer, seed=config.seed)
    model.train()
    texts = [t + tokenizer.eos_token for t in corpus]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(config.seed)
    with Progress(transient=True) as progress:
        task = progress.add_task("pretraining the tiny base", total=config.steps)
        for step in range(config.steps):
            rows = torch.randint(0, ids.shape[0], (config.batch_size,), generator=generator)
            width = int(mask[rows].sum(1).max())
            out = model(
                input_ids=ids[rows, :width],
                attention_mask=mask[rows, :width],
                labels=labels[rows, :width],
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress.update(
                task,
                advance=1,
                description=f"pretraining the tiny base (loss {out.loss.item():.3f})",
            )
            if step % 100 == 0 or step == config.steps - 1:
                log.info("pretrain step %d/%d loss %.4f", step + 1, config.steps, out.loss.item())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
