"""Import preference comparisons from JSONL files into the local store.

Two formats, detected per line:

* Hugging Face preference format: ``{"prompt": ..., "chosen": ..., "rejected": ...}``,
  with plain strings or (conversational) lists of ``{"role", "content"}`` messages.
* Anthropic-HH dialogues: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; the shared dialogue up to the last ``Assistant:`` turn is the
  prompt, the rest of each is the response.

The whole file is validated before anything is written: the first bad line raises
:class:`ImportFileError` naming file and line, and the store is left as it was.
Importing the same file twice adds nothing the second time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.store import NewComparison, PreferenceStore

MAX_TEXT_CHARS = 20_000
"""Longest prompt or response accepted; longer texts are refused, not truncated."""
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class ImportFileError(ValueError):
    """A line of an import file is malformed; the message names file and line."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class ImportReport:
    path: Path
    comparisons: int
    added: int
    duplicates: int


def _messages(value: list[Any], field: str) -> list[tuple[str, str]]:
    """(role, content) of a conversational field: a list of {"role", "content"} objects."""
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(
                f"field {field!r}: message {i} must be an object with a string 'content'"
            )
        role = message.get("role", "")
        if not isinstance(role, str):
            raise ValueError(f"field {field!r}: message {i} has a non-string 'role'")
        out.append((role, message["content"]))
    return out


def _text_field(record: dict[str, Any], field: str) -> str:
    """A field as text; a prompt's messages keep their roles, a response's do not."""
    if field not in record:
        raise ValueError(f"missing field {field!r}")
    value = record[field]
    if isinstance(value, list):
        turns = _messages(value, field)
        if field == "prompt":
            return "\n\n".join(
                f"{role.capitalize()}: {text}" if role else text for role, text in turns
            )
        return "\n\n".join(text for _, text in turns)
    if not isinstance(value, str):
        raise ValueError(
            f"field {field!r} must be a string or a list of messages, got {type(value).__name__}"
        )
    return value


def _split_hh(dialogue: str, field: str) -> tuple[str, str]:
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(
            f"field {field!r} has no {HH_ASSISTANT.strip()!r} turn (Anthropic-HH format)"
        )
    return dialogue[: cut + len(HH_ASSISTANT)], dialogue[cut + len(HH_ASSISTANT) :].strip()


def parse_record(record: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from one decoded JSON line; raises ValueError."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        prompt = _text_field(record, "prompt")
        chosen = _text_field(record, "chosen")
        rejected = _text_field(record, "rejected")
    else:
        chosen_dialogue = _text_field(record, "chosen")
        rejected_dialogue = _text_field(record, "rejected")
        if HH_ASSISTANT not in chosen_dialogue and HH_HUMAN not in chosen_dialogue:
            raise ValueError(
                "missing field 'prompt' (and 'chosen' is not an Anthropic-HH dialogue)"
            )
        prompt, chosen = _split_hh(chosen_dialogue, "chosen")
        rejected_prompt, rejected = _split_hh(rejected_dialogue, "rejected")
        if rejected_prompt != prompt:
            raise ValueError(
                "'chosen' and 'rejected' dialogues differ before the last Assistant turn"
            )
    for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ValueError(f"field {name!r} is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(
                f"field {name!r} has {len(text)} characters, more than {MAX_TEXT_CHARS}"
            )
        if "\x00" in text:
            raise ValueError(f"field {name!r} contains a NUL character")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are identical")
    return prompt, chosen, rejected


def read_comparisons(path: str | Path, annotator: str = "import") -> list[NewComparison]:
    """Parse and validate a whole JSONL file; raises :class:`ImportFileError`."""
    path = Path(path)
    comparisons: list[NewComparison] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ImportFileError(
                    path,
                    number,
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportFileError(
                    path, number, f"bad JSON: {exc.msg} at column {exc.colno}"
                ) from None
            try:
                prompt, chosen, rejected = parse_record(record)
            except ValueError as exc:
                raise ImportFileError(path, number, str(exc)) from None
            who = record.get("annotator", annotator)
            if not isinstance(who, str) or not who.strip():
                raise ImportFileError(path, number, "field 'annotator' must be a non-empty string")
            comparisons.append(
                NewComparison(prompt, chosen, rejected, who, origin=f"{path.name}:{number}")
            )
    if not comparisons:
        raise ImportFileError(path, 0, "the file holds no comparisons")
    return comparisons


def import_jsonl(
    store: PreferenceStore, path: str | Path, annotator: str = "import"
) -> ImportReport:
    """Validate ``path`` completely, then add its comparisons in one transaction."""
    comparisons = read_comparisons(path, annotator)
    added, duplicates = store.add_comparisons(comparisons, source="import")
    return ImportReport(Path(path), len(comparisons), added, duplicates)
