"""Shared fixtures: a tiny base model built from a config and saved to a temporary
directory, so every test loads it the way users load theirs (``from_pretrained``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny Llama-style base with a byte-level BPE tokenizer, on disk."""
    from common.model import build_byte_level_tokenizer, build_tiny_base

    corpus = [
        "How do I cook pasta?\nSimmer it gently and taste as you go.",
        "Any advice on my budget?\nTrack spending and save a fixed share.",
    ] * 20
    tokenizer = build_byte_level_tokenizer(corpus, vocab_size=300)
    model = build_tiny_base(tokenizer, seed=0)
    path = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
