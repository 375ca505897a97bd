"""Random checkpoints of real architectures, built here and saved with ``save_pretrained``.

Nothing is downloaded: the shapes are the published configs (GPT-2 small, Qwen2.5-0.5B,
Llama-3.2-1B), the weights are random, and each tokenizer is a small byte-level BPE
with its family's conventions: special tokens, BOS and EOS, pad token or none, and chat
template (Llama 3's header turns, Qwen's ChatML, none for GPT-2). A checkpoint loads
with ``from_pretrained`` like the real one, so every code path a partner's model takes
(chat rendering, missing pad token, Conv1D layers, grouped-query attention, tied
embeddings, large vocabularies) runs in tests and benchmarks.

    python -m simulations.architectures qwen2.5-0.5b /tmp/qwen   # one preset, on disk
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_CORPUS = [
    "How do I cook pasta? Simmer it gently and taste as you go.",
    "Any advice on my budget? Track spending and save a fixed share.",
    "a fine answer, a poor reply, a clear and helpful response to the question",
    "Human: hello there. Assistant: hello, how can I help you today?",
] * 10


@dataclass(frozen=True)
class TokenizerStyle:
    """A model family's special tokens and how its tokenizer uses them."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    chat_template: str | None
    adds_bos: bool
    """Whether encoding a text puts BOS in front by default (Llama's tokenizers do)."""


LLAMA3_STYLE = TokenizerStyle(
    specials=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad=None,
    chat_template=LLAMA3_TEMPLATE,
    adds_bos=True,
)
QWEN2_STYLE = TokenizerStyle(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    chat_template=CHATML_TEMPLATE,
    adds_bos=False,
)
GPT2_STYLE = TokenizerStyle(
    specials=("<|endoftext|>",),
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    pad=None,
    chat_template=None,
    adds_bos=False,
)


def build_tokenizer(style: TokenizerStyle, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE learned from a small corpus, with ``style``'s conventions."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(style.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    if style.adds_bos:
        bos_id = tokenizer.token_to_id(style.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A",
            pair=f"{style.bos} $A $B",
            special_tokens=[(style.bos, bos_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=style.bos, eos_token=style.eos, pad_token=style.pad
    )
    if style.chat_template:
        fast.chat_template = style.chat_template
    return fast


@dataclass(frozen=True)
class Architecture:
    """A model family: its config class, model class and tokenizer conventions."""

    name: str
    style: TokenizerStyle
    make: Callable[[int, PreTrainedTokenizerFast, bool], tuple[PretrainedConfig, type]]
    """(vocab size, tokenizer, published size?) -> (config, model class)."""


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


TINY_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
"""The tests' shape for Llama- and Qwen2-style decoders (grouped-query attention kept)."""
LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
        "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
)  # fmt: skip
QWEN2_5_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)  # fmt: skip


def _llama(vocab: int, tokenizer: PreTrainedTokenizerFast, published: bool):  # noqa: ANN202
    shape = LLAMA_3_2_1B if published else TINY_DECODER
    config = LlamaConfig(
        vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=True,
        **shape, **_token_ids(tokenizer),
    )  # fmt: skip
    return config, LlamaForCausalLM


def _qwen2(vocab: int, tokenizer: PreTrainedTokenizerFast, published: bool):  # noqa: ANN202
    shape = QWEN2_5_0_5B if published else TINY_DECODER
    config = Qwen2Config(
        vocab_size=vocab, rms_norm_eps=1e-6, tie_word_embeddings=True,
        **shape, **_token_ids(tokenizer),
    )  # fmt: skip
    return config, Qwen2ForCausalLM


def _gpt2(vocab: int, tokenizer: PreTrainedTokenizerFast, published: bool):  # noqa: ANN202
    shape = (
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)  # GPT-2 small
        if published
        else dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)
    )
    config = GPT2Config(vocab_size=vocab, **shape, **_token_ids(tokenizer))
    return config, GPT2LMHeadModel


ARCHITECTURES = {
    "llama": Architecture("llama", LLAMA3_STYLE, _llama),
    "qwen2": Architecture("qwen2", QWEN2_STYLE, _qwen2),
    "gpt2": Architecture("gpt2", GPT2_STYLE, _gpt2),
}


@dataclass(frozen=True)
class Preset:
    """A published model shape: the architecture and its real vocabulary size."""

    architecture: str
    vocab_size: int


PRESETS = {
    "gpt2-small": Preset("gpt2", 50257),
    "qwen2.5-0.5b": Preset("qwen2", 151936),
    "llama-3.2-1b": Preset("llama", 128256),
}


def build_checkpoint(
    architecture: str, directory: str | Path, preset: str | None = None, seed: int = 0
) -> Path:
    """Save a random checkpoint of ``architecture`` (tiny, or ``preset``'s published
    shape) and its tokenizer to ``directory``; returns the directory."""
    arch = ARCHITECTURES[architecture]
    tokenizer = build_tokenizer(arch.style)
    vocab = PRESETS[preset].vocab_size if preset else len(tokenizer)
    config, model_class = arch.make(vocab, tokenizer, preset is not None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: PreTrainedModel = model_class(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_preset(preset: str, directory: str | Path, seed: int = 0) -> Path:
    """A published shape with random weights (``gpt2-small``, ``qwen2.5-0.5b``, ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return build_checkpoint(PRESETS[preset].architecture, directory, preset, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(build_preset(args.preset, args.out))


if __name__ == "__main__":
    main()
