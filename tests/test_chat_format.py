"""Prompts and responses in each tokenizer family's format (chat template or plain)."""

from __future__ import annotations

import pytest

from common.chat_format import bos_prefix, dialogue_messages, prompt_token_ids, render_prompt
from common.config import ConfigError, RunConfig
from common.model import encode_texts_with_starts
from simulations.architectures import GPT2_STYLE, LLAMA3_STYLE, QWEN2_STYLE, build_tokenizer


def test_stored_dialogues_read_back_as_chat_messages():
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Plan my week?\n\nAssistant:"
    assert dialogue_messages(hh) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Plan my week?"},
    ]
    # What the importer writes for a message-list prompt.
    assert dialogue_messages("System: Be brief.\n\nUser: Why is the sky blue?") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert dialogue_messages("How do I cook pasta?") == [
        {"role": "user", "content": "How do I cook pasta?"}
    ]


def test_chat_templates_render_the_assistant_turn_and_plain_tokenizers_add_a_newline():
    llama, qwen, gpt2 = (build_tokenizer(s) for s in (LLAMA3_STYLE, QWEN2_STYLE, GPT2_STYLE))
    assert render_prompt(llama, "Hi") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_prompt(qwen, "Hi").endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(gpt2, "Hi") == "Hi\n"
    # BOS once: the template writes Llama's, so the tokenizer's default one is not added.
    assert prompt_token_ids(llama, ["Hi"])[0].count(llama.bos_token_id) == 1
    assert bos_prefix(gpt2) == [] and bos_prefix(qwen) == []
    llama.chat_template = None  # a Llama base model without a template: BOS, then text
    assert bos_prefix(llama) == [llama.bos_token_id]


@pytest.mark.parametrize("style", [LLAMA3_STYLE, QWEN2_STYLE, GPT2_STYLE])
def test_long_prompts_are_cut_from_the_left_and_responses_end_with_eos(style):
    tokenizer = build_tokenizer(style)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids, mask, starts = encode_texts_with_starts(
        tokenizer, ["word " * 200, "short?"], ["an answer", "a reply"], max_length=24
    )
    assert ids.shape[1] <= 24
    for row, m, start in zip(ids, mask, starts, strict=True):
        real = row[: int(m.sum())].tolist()
        assert real[-1] == tokenizer.eos_token_id
        response = tokenizer.decode(real[int(start) : -1])
        assert response in ("an answer", "a reply")
        if style.adds_bos and style.chat_template is None:
            assert real[0] == tokenizer.bos_token_id


def test_a_node_sets_its_own_device_and_dtype():
    config = RunConfig().on_node({"store": "x.sqlite", "device": "cpu", "dtype": "bfloat16"})
    assert (config.model.device, config.model.dtype) == ("cpu", "bfloat16")
    assert RunConfig().on_node({"store": "x.sqlite"}) == RunConfig()
    with pytest.raises(ConfigError, match="model.dtype must be"):
        RunConfig().on_node({"dtype": "int8"})
