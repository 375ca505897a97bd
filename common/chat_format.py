"""How a prompt and a response become tokens, for every phase alike.

With a chat template (instruction-tuned Llama, Qwen, Gemma tokenizers), the prompt is
the dialogue rendered by the template up to the assistant's turn
(``add_generation_prompt``), and the response is that turn, ended by the EOS token:
what TRL's trainers do with conversational data. Without one (GPT-2, base models,
the built-in bases), the prompt is its text plus a newline, after the BOS token where
the tokenizer puts one. Training, scoring, generation and candidates all go through
here, so a policy is sampled in the format its reward model was trained on.

The store keeps prompts as text: a dialogue as ``Human:``/``User:``/``Assistant:``/
``System:`` turns separated by blank lines (the importers write message lists and
Anthropic-HH dialogues that way); :func:`dialogue_messages` reads them back as roles.
"""

from __future__ import annotations

import re

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

ROLES = {"human": "user", "user": "user", "assistant": "assistant", "system": "system"}
_TURN = re.compile(r"(?:^|\n\n)(Human|User|Assistant|System):[ \t]?")


def dialogue_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of a stored prompt as chat messages; a prompt without role markers is
    one user message. A trailing empty ``Assistant:`` turn (HH prompts end with one) is
    the turn to be generated, not a message."""
    parts = _TURN.split(prompt)
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for marker, text in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": ROLES[marker.lower()], "content": text.strip()})
    if len(messages) > 1 and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages or [{"role": "user", "content": prompt}]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model reads it before the response (see the module's doc)."""
    if not has_chat_template(tokenizer):
        return prompt + "\n"
    messages = dialogue_messages(prompt)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        # Some templates (Gemma's) refuse a system turn: fold it into the first user turn.
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
        return tokenizer.apply_chat_template(
            [merged, *rest], tokenize=False, add_generation_prompt=True
        )


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before a text by default (Llama's and Gemma's BOS;
    none for GPT-2 and Qwen). A chat template writes its own, so it gets none here."""
    if has_chat_template(tokenizer):
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[-len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Each prompt's tokens, rendered and with its BOS (the first token a left cut keeps)."""
    prefix = bos_prefix(tokenizer)
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    rows = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return [prefix + list(row) for row in rows]


def response_token_ids(
    tokenizer: PreTrainedTokenizerBase, responses: list[str], max_tokens: int
) -> list[list[int]]:
    """Each response's tokens, cut to ``max_tokens - 1``, then EOS (where the reward is
    read and generation stops)."""
    rows = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [list(row)[: max_tokens - 1] + [tokenizer.eos_token_id] for row in rows]


def cut_prompt(row: list[int], room: int, bos_token_id: int | None) -> list[int]:
    """The last ``room`` tokens of a prompt, keeping a leading BOS."""
    if room <= 0:
        return []
    if len(row) <= room:
        return row
    if bos_token_id is not None and row and row[0] == bos_token_id:
        return [row[0], *row[len(row) - room + 1 :]] if room > 1 else [row[0]]
    return row[len(row) - room :]
