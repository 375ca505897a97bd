"""The built-in English base: built from WordNet on this machine, cached, installable."""

from __future__ import annotations

import json

import pytest
import torch

from common.config import ConfigError
from common.english_base import (
    EnglishBaseRecipe,
    english_base_dir,
    install_english_base,
    weights_fingerprint,
    wordnet_texts,
)
from common.model import LlamaShape, build_tiny_base, load_base
from common.pretraining import PretrainSchedule

SMALL = EnglishBaseRecipe(
    shape=LlamaShape(hidden=32, layers=1, heads=2, intermediate=64),
    vocab_size=2048,
    schedule=PretrainSchedule(
        steps=40, batch_size=16, learning_rate=3e-3, max_tokens=32, pack=True
    ),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return english_base_dir(tmp_path_factory.mktemp("cache"), SMALL)


def test_wordnet_texts_are_english_sentences():
    texts = wordnet_texts()
    assert len(texts) > 100_000
    assert any(t.startswith("Sourdough (noun):") for t in texts)


def test_built_base_loads_with_from_pretrained_and_has_learned(built, tmp_path):
    model, tokenizer = load_base(str(built))
    # Everyday words are single tokens; capitals cost nothing extra (lowercased).
    assert len(tokenizer("water", add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer("Water")["input_ids"] == tokenizer("water")["input_ids"]
    # Pretraining lowered the loss on English it never saw below a fresh model's.
    text = "Water the plants in the morning and keep the leaves dry."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss.item()
    untrained = build_tiny_base(tokenizer, seed=0, shape=SMALL.shape)
    with torch.no_grad():
        assert trained < untrained(input_ids=ids, labels=ids).loss.item() - 0.5
    recipe = json.loads((built / "fedrlhf-recipe.json").read_text())
    assert recipe["vocab_size"] == SMALL.vocab_size


def test_cached_build_is_reused(built, tmp_path):
    stamp = (built / "config.json").stat().st_mtime_ns
    assert english_base_dir(built.parent, SMALL) == built
    assert (built / "config.json").stat().st_mtime_ns == stamp


def test_install_copies_the_same_weights_and_refuses_another_recipe(built, tmp_path):
    other_machine = tmp_path / "other-cache"
    installed = install_english_base(built, other_machine, SMALL)
    assert weights_fingerprint(installed) == weights_fingerprint(built)
    # builtin:english on that machine now finds it without building anything.
    assert english_base_dir(other_machine, SMALL) == installed
    with pytest.raises(ConfigError, match="another recipe"):
        install_english_base(built, tmp_path / "third", EnglishBaseRecipe())
