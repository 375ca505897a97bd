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
from dataclasses import asdict, dataclass
from pathlib import Path

from common.model import build_byte_level_tokenizer, build_tiny_base
from common.pretraining import PretrainSchedule, cached_build, pretrain_causal_lm
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
    return cached_build(target, lambda tmp: train_base(world, config, tmp))


def train_base(world: World, config: PretrainConfig, out_dir: Path) -> None:
    """Train tokenizer and tiny causal LM on the world's corpus; save both to ``out_dir``."""
    corpus = world.corpus(config.corpus_size, seed=config.seed)
    tokenizer = build_byte_level_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_tiny_base(tokenizer, seed=config.seed)
    schedule = PretrainSchedule(
        config.steps, config.batch_size, config.learning_rate, max_tokens=256, seed=config.seed
    )
    pretrain_causal_lm(model, tokenizer, corpus, schedule, "pretraining the tiny base")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
