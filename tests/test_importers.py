import json

import pytest

from client.importers import ImportFileError, import_jsonl, read_comparisons
from client.store import PreferenceStore


def write_jsonl(path, rows):
    path.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )
    return path


GOOD = [
    {
        "prompt": "How do I cook rice?",
        "chosen": "Rinse it, then simmer.",
        "rejected": "Eat it raw.",
    },
    {
        "prompt": "Any tips for a run?",
        "chosen": "Warm up first.",
        "rejected": "Sprint at once.",
        "annotator": "ana",
    },
]
HH = {
    "chosen": "\n\nHuman: Hi, how do I fix a bug?\n\nAssistant: Write a failing test first.",
    "rejected": "\n\nHuman: Hi, how do I fix a bug?\n\nAssistant: Delete the tests.",
}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "Budget advice?"}],
    "chosen": [{"role": "assistant", "content": "Track spending."}],
    "rejected": [{"role": "assistant", "content": "Bet it all."}],
}


@pytest.fixture()
def store(tmp_path):
    with PreferenceStore(tmp_path / "org.sqlite") as s:
        yield s


def test_import_all_formats_and_is_idempotent(store, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [*GOOD, HH, CONVERSATIONAL])
    first = import_jsonl(store, path)
    assert (first.comparisons, first.added, first.duplicates) == (4, 4, 0)
    again = import_jsonl(store, path)
    assert (again.added, again.duplicates) == (0, 4)
    rows = store.comparisons()
    assert len(rows) == 4 and store.counts()["prompts"] == 4
    hh = rows[2]
    assert hh.prompt.endswith("\n\nAssistant:") and hh.chosen == "Write a failing test first."
    assert rows[3].prompt == "User: Budget advice?" and rows[3].chosen == "Track spending."
    assert (
        rows[1].annotator == "ana" and rows[0].annotator == "import" and rows[0].source == "import"
    )


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (b'{"prompt": "x", "chosen": "a", ', "bad JSON"),
        (b'["a list"]', "expected a JSON object, got list"),
        (json.dumps({"prompt": "x", "chosen": "a"}).encode(), "missing field 'rejected'"),
        (json.dumps({"chosen": "a", "rejected": "b"}).encode(), "missing field 'prompt'"),
        (
            json.dumps({"prompt": "x", "chosen": "  ", "rejected": "b"}).encode(),
            "field 'chosen' is empty",
        ),
        (json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}).encode(), "identical"),
        (
            json.dumps({"prompt": "x", "chosen": 3, "rejected": "b"}).encode(),
            "field 'chosen' must be a string",
        ),
        (
            json.dumps({"prompt": "x", "chosen": "a" * 20_001, "rejected": "b"}).encode(),
            "20001 characters",
        ),
        (
            b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
            "not valid UTF-8 \\(byte 0xe9 at column 16\\)",
        ),
        (
            json.dumps({**HH, "rejected": "\n\nHuman: other\n\nAssistant: x"}).encode(),
            "differ before the last",
        ),
        (
            json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "annotator": ""}).encode(),
            "annotator",
        ),
    ],
)
def test_malformed_line_names_file_and_line_and_leaves_store_unchanged(
    store, tmp_path, bad_line, message
):
    import_jsonl(store, write_jsonl(tmp_path / "before.jsonl", GOOD[:1]))
    before = store.snapshot()
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[1], b"", bad_line, HH])
    with pytest.raises(ImportFileError, match=message) as info:
        import_jsonl(store, path)
    assert info.value.line == 3 and str(info.value).startswith(f"{path}:3: ")
    assert store.snapshot() == before


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ImportFileError, match="no comparisons"):
        read_comparisons(path)
