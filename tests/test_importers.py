import json

import pytest

from client.importers import ImportFileError, import_file, read_comparisons, read_prompts
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
    first = import_file(store, path)
    assert (first.comparisons, first.added, first.duplicates) == (4, 4, 0)
    again = import_file(store, path)
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
    import_file(store, write_jsonl(tmp_path / "before.jsonl", GOOD[:1]))
    before = store.snapshot()
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[1], b"", bad_line, HH])
    with pytest.raises(ImportFileError, match=message) as info:
        import_file(store, path)
    assert info.value.line == 3 and str(info.value).startswith(f"{path}:3: ")
    assert store.snapshot() == before


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ImportFileError, match="no comparisons"):
        read_comparisons(path)


def test_a_utf8_file_with_a_byte_order_mark_imports(store, tmp_path):
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in GOOD) + b"\r\n")
    report = import_file(store, path)
    assert (report.comparisons, report.added) == (2, 2)
    assert store.comparisons()[0].prompt == GOOD[0]["prompt"]


def _dataset(records):
    import datasets

    return datasets.Dataset.from_list(records)


def test_parquet_and_save_to_disk_data_sets_import_like_jsonl(store, tmp_path):
    records = [{**GOOD[0], "annotator": "ana"}, {**GOOD[1]}, {**GOOD[0], "chosen": "Steam it."}]
    _dataset(records).to_parquet(str(tmp_path / "prefs.parquet"))
    _dataset(records).save_to_disk(str(tmp_path / "prefs-dir"))
    parquet = read_comparisons(tmp_path / "prefs.parquet")
    on_disk = read_comparisons(tmp_path / "prefs-dir")
    assert [(c.prompt, c.chosen, c.rejected, c.annotator) for c in parquet] == [
        (c.prompt, c.chosen, c.rejected, c.annotator) for c in on_disk
    ]
    assert [c.annotator for c in parquet] == ["ana", "ana", "import"]
    assert parquet[1].origin == "prefs.parquet:row 2"
    report = import_file(store, tmp_path / "prefs.parquet")
    assert (report.added, report.duplicates) == (3, 0)
    assert import_file(store, tmp_path / "prefs-dir").duplicates == 3


def test_conversational_rows_in_a_data_set(tmp_path):
    _dataset(
        [CONVERSATIONAL, CONVERSATIONAL | {"chosen": [{"role": "assistant", "content": "Save."}]}]
    ).to_parquet(str(tmp_path / "chat.parquet"))
    first, second = read_comparisons(tmp_path / "chat.parquet")
    assert first.prompt == "User: Budget advice?" and second.chosen == "Save."


def test_a_malformed_row_in_a_good_data_set_is_refused_by_file_and_row(store, tmp_path):
    records = [GOOD[0], GOOD[1], {**GOOD[0], "chosen": "   "}, GOOD[1]]
    path = tmp_path / "prefs.parquet"
    _dataset(records).to_parquet(str(path))
    before = store.snapshot()
    with pytest.raises(ImportFileError, match="field 'chosen' is empty") as info:
        import_file(store, path)
    assert str(info.value).startswith(f"{path}: row 3: ") and info.value.line == 3
    assert store.snapshot() == before


def test_a_data_set_with_several_splits_asks_for_one(tmp_path):
    import datasets

    both = datasets.DatasetDict({"train": _dataset(GOOD), "test": _dataset(GOOD[:1])})
    both.save_to_disk(str(tmp_path / "hh"))
    with pytest.raises(ImportFileError, match=r"splits \['test', 'train'\]; name one"):
        read_comparisons(tmp_path / "hh")
    assert len(read_comparisons(tmp_path / "hh" / "test")) == 1


def test_json_arrays_and_csv_read_through_datasets(tmp_path):
    (tmp_path / "prefs.json").write_text(json.dumps(GOOD))
    (tmp_path / "prefs.csv").write_text(
        "prompt,chosen,rejected\n"
        + "\n".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"' for r in GOOD)
    )
    for name in ("prefs.json", "prefs.csv"):
        assert [c.chosen for c in read_comparisons(tmp_path / name)] == [r["chosen"] for r in GOOD]
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ImportFileError, match="not a readable data set"):
        read_comparisons(tmp_path / "broken.parquet")


def test_prompts_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(
        b"\xef\xbb\xbfHow do I cook rice?\n\nAny tips for a run?\nHow do I cook rice?\n"
    )
    assert read_prompts(tmp_path / "prompts.txt") == ["How do I cook rice?", "Any tips for a run?"]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Budget advice?"}, CONVERSATIONAL])
    assert read_prompts(path) == ["Budget advice?", "User: Budget advice?"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(ImportFileError, match=r"bad.jsonl:2: missing field 'prompt'"):
        read_prompts(bad)


def test_import_prompts_command_adds_a_pool_and_refuses_a_bad_line_by_number(tmp_path, capsys):
    from fedrlhf.cli import main

    store_path = tmp_path / "org.sqlite"
    (tmp_path / "pool.txt").write_text("How do I cook rice?\nAny tips for a run?\n")
    assert main(["import-prompts", "--store", str(store_path), str(tmp_path / "pool.txt")]) == 0
    assert "2 prompts, 2 added" in capsys.readouterr().out
    with PreferenceStore(store_path) as store:
        before = store.snapshot()
        assert set(store.prompts()) == {"How do I cook rice?", "Any tips for a run?"}

    bad = tmp_path / "more.jsonl"
    bad.write_text('{"prompt": "Budget advice?"}\n{"prompt": "Rice?"}\n{"prompt": ""}\n')
    assert main(["import-prompts", "--store", str(store_path), str(bad)]) == 2
    assert f"{bad}:3: field 'prompt' is empty" in capsys.readouterr().err
    with PreferenceStore(store_path) as store:
        assert store.snapshot() == before  # nothing of the bad file was written
