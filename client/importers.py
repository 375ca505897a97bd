"""Import preference comparisons from files and data sets into the local store.

Files: JSON Lines (``.jsonl``, or ``.json`` holding one object per line), read line by
line here so an error names the line; and, read with Hugging Face ``datasets``, a
JSON array (``.json``), Parquet (``.parquet``), CSV (``.csv``) or a directory written
by ``Dataset.save_to_disk`` (errors name the row). Two record formats, per row:

* Hugging Face preference format: ``{"prompt": ..., "chosen": ..., "rejected": ...}``,
  with plain strings or (conversational) lists of ``{"role", "content"}`` messages.
* Anthropic-HH dialogues: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; the shared dialogue up to the last ``Assistant:`` turn is the
  prompt, the rest of each is the response.

The whole file is validated before anything is written: the first bad row raises
:class:`ImportFileError` naming file and line (or row), and the store is left as it
was. Importing the same file twice adds nothing the second time. A UTF-8 byte-order
mark (Excel and Windows exports write one) is accepted.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.store import NewComparison, PreferenceStore

MAX_TEXT_CHARS = 20_000
"""Longest prompt or response accepted; longer texts are refused, not truncated."""
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


DATASET_SUFFIXES = (".parquet", ".csv", ".json")
"""Read with Hugging Face ``datasets`` (besides JSON Lines and ``save_to_disk`` folders)."""


class ImportFileError(ValueError):
    """A line (or data-set row) of an import file is malformed; the message names both.

    ``file.jsonl:12: reason`` for a line, ``file.parquet: row 12: reason`` for a row.
    """

    def __init__(self, path: Path | str, line: int, message: str, unit: str = "line") -> None:
        place = f"{path}:{line}" if unit == "line" else f"{path}: {unit} {line}"
        super().__init__(f"{place}: {message}")
        self.path = Path(path)
        self.line = line
        self.unit = unit


@dataclass(frozen=True)
class Row:
    """One decoded record of a file, with where it came from."""

    path: Path
    number: int
    """Line number (JSON Lines) or 1-based row index (data sets)."""
    unit: str
    """``line`` or ``row``."""
    record: Any

    @property
    def origin(self) -> str:
        return (
            f"{self.path.name}:{self.number}"
            if self.unit == "line"
            else (f"{self.path.name}:row {self.number}")
        )

    def error(self, message: str) -> ImportFileError:
        return ImportFileError(self.path, self.number, message, self.unit)


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
        _check_text(text, name)
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are identical")
    return prompt, chosen, rejected


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
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
            yield Row(path, number, "line", record)


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _dataset_rows(path: Path) -> Iterator[Row]:
    """Rows of a data set read with Hugging Face ``datasets``; missing values dropped."""
    import datasets  # a heavy import, only for these formats

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise ImportFileError(
                        path, 0, f"holds the splits {sorted(loaded)}; name one: {path}/SPLIT", "row"
                    )
                loaded = next(iter(loaded.values()))
        else:
            builder = {".parquet": "parquet", ".csv": "csv", ".json": "json"}[path.suffix]
            with tempfile.TemporaryDirectory(prefix="fedrlhf-datasets-") as cache:
                loaded = datasets.load_dataset(
                    builder,
                    data_files=str(path),
                    split="train",
                    cache_dir=cache,
                    keep_in_memory=True,
                )
    except ImportFileError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
        raise ImportFileError(path, 0, f"not a readable data set ({exc})", "row") from None
    for index, record in enumerate(loaded):
        yield Row(path, index + 1, "row", {k: v for k, v in record.items() if v is not None})


def read_rows(path: str | Path) -> list[Row]:
    """Every record of a preference file or data set, decoded but not yet validated."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() or (
        path.suffix in DATASET_SUFFIXES
        and not (path.suffix == ".json" and not _is_json_array(path))
    ):
        return list(_dataset_rows(path))
    return list(_jsonl_rows(path))


def comparison_of(row: Row, annotator: str = "import") -> NewComparison:
    """Validate one row; raises :class:`ImportFileError` naming its file and line/row."""
    try:
        prompt, chosen, rejected = parse_record(row.record)
    except ValueError as exc:
        raise row.error(str(exc)) from None
    who = row.record.get("annotator", annotator)
    if not isinstance(who, str) or not who.strip():
        raise row.error("field 'annotator' must be a non-empty string")
    return NewComparison(prompt, chosen, rejected, who, origin=row.origin)


def read_comparisons(path: str | Path, annotator: str = "import") -> list[NewComparison]:
    """Parse and validate a whole file or data set; raises :class:`ImportFileError`."""
    comparisons = [comparison_of(row, annotator) for row in read_rows(path)]
    if not comparisons:
        raise ImportFileError(path, 0, "the file holds no comparisons")
    return comparisons


def import_file(
    store: PreferenceStore, path: str | Path, annotator: str = "import"
) -> ImportReport:
    """Validate ``path`` completely, then add its comparisons in one transaction."""
    comparisons = read_comparisons(path, annotator)
    added, duplicates = store.add_comparisons(comparisons, source="import")
    return ImportReport(Path(path), len(comparisons), added, duplicates)


def _check_text(text: str, name: str) -> None:
    if not text.strip():
        raise ValueError(f"field {name!r} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"field {name!r} has {len(text)} characters, more than {MAX_TEXT_CHARS}")
    if "\x00" in text:
        raise ValueError(f"field {name!r} contains a NUL character")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts, distinct and in order: JSON Lines (or any data set) with a ``prompt``
    field (text or messages), or a plain text file with one prompt per line."""
    path = Path(path)
    if path.suffix in (".txt", ".text"):
        rows = []
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ImportFileError(path, number, f"not valid UTF-8 ({exc.reason})") from None
            if text.strip():
                rows.append(Row(path, number, "line", {"prompt": text.strip()}))
    else:
        rows = read_rows(path)
    prompts = []
    for row in rows:
        if not isinstance(row.record, dict):
            raise row.error(f"expected a JSON object, got {type(row.record).__name__}")
        try:
            prompt = _text_field(row.record, "prompt")
            _check_text(prompt, "prompt")
        except ValueError as exc:
            raise row.error(str(exc)) from None
        prompts.append(prompt)
    if not prompts:
        raise ImportFileError(path, 0, "the file holds no prompts")
    return list(dict.fromkeys(prompts))


def import_prompts(store: PreferenceStore, path: str | Path) -> tuple[int, int]:
    """Validate ``path`` completely, then add its prompts to the store's pool for policy
    rounds in one transaction; returns (distinct prompts read, new to the store)."""
    prompts = read_prompts(path)
    return len(prompts), store.add_prompts(prompts)
