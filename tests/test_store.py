import sqlite3

import pytest

from client.store import NewComparison, PreferenceStore, StoreError, content_hash, is_heldout
from common.privacy import DPEvent


def test_schema_wal_and_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    with PreferenceStore(path) as store:
        store.add_comparisons([NewComparison("p", "a", "b", "x")], source="human")
    with PreferenceStore(path) as store:
        assert store.counts()["comparisons"] == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_not_a_store_is_refused(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a fedrlhf store"):
        PreferenceStore(path)


def test_failed_batch_rolls_back(tmp_path):
    with PreferenceStore(tmp_path / "s.sqlite") as store:
        store.add_comparisons([NewComparison("p", "a", "b", "x")], source="human")
        before = store.snapshot()

        def items():
            yield NewComparison("q", "c", "d", "x")
            raise RuntimeError("crash mid-import")

        with pytest.raises(RuntimeError):
            store.add_comparisons(items(), source="import")
        assert store.snapshot() == before
        with pytest.raises(ValueError, match="source must be one of"):
            store.add_comparisons([NewComparison("q", "c", "d", "x")], source="web")


def test_heldout_split_is_stable_and_near_the_fraction(tmp_path):
    hashes = [content_hash(str(i)) for i in range(4000)]
    share = sum(is_heldout(h, 0.1) for h in hashes) / len(hashes)
    assert 0.08 < share < 0.12
    with PreferenceStore(tmp_path / "s.sqlite") as store:
        store.add_comparisons(
            [NewComparison(f"p{i}", "a", "b", "x") for i in range(200)], source="simulated"
        )
        train, held = store.comparisons("train", 0.1), store.comparisons("heldout", 0.1)
        assert len(train) + len(held) == 200 and not {c.id for c in train} & {c.id for c in held}
        assert [c.id for c in store.comparisons("heldout", 0.1)] == [c.id for c in held]


def test_ledger_charges_before_training_and_commits_actual_steps(tmp_path):
    with PreferenceStore(tmp_path / "s.sqlite") as store:
        entry = store.begin_charge(
            "run", "reward", 1, DPEvent(1.0, 0.1, 20), "secure", "training", "comparison"
        )
        assert store.privacy_events() == [DPEvent(1.0, 0.1, 20)]  # pending counts in full
        assert store.ledger()[0].status == "pending"
        store.commit_charge(entry, 20)
        assert store.ledger()[0].status == "committed"
        with pytest.raises(ValueError, match="not a pending charge"):
            store.commit_charge(entry, 20)
        second = store.begin_charge(
            "run", "reward", 2, DPEvent(1.0, 0.1, 20), "seeded", "training", "comparison"
        )
        with pytest.raises(ValueError, match="21 steps > 20 planned"):
            store.commit_charge(second, 21)


def test_a_version_1_store_opens_with_its_ledger_marked_seeded_training(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the ledger of a store written by version 1
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE privacy_ledger (
                id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, phase TEXT NOT NULL,
                round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,
                sample_rate REAL NOT NULL, steps INTEGER NOT NULL, status TEXT NOT NULL,
                created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
            INSERT INTO privacy_ledger VALUES
                (1, 'run', 'reward', 1, 1.2, 0.05, 20, 'committed', 't', 't');
            """
        )
    conn.close()
    with PreferenceStore(path) as store:
        assert [(e.event, e.randomness, e.mechanism, e.unit) for e in store.ledger()] == [
            (DPEvent(1.2, 0.05, 20), "seeded", "training", "comparison")
        ]
        store.begin_charge(
            "run", "reward", 2, DPEvent(1.0, 0.05, 20), "secure", "statistics", "prompt"
        )
        assert [(e.randomness, e.mechanism) for e in store.ledger()] == [
            ("seeded", "training"),
            ("secure", "statistics"),
        ]
        for bad in (("urandom-ish", "training"), ("secure", "gossip")):
            with pytest.raises(sqlite3.IntegrityError):
                store.begin_charge("run", "reward", 3, DPEvent(1.0, 0.05, 20), *bad, "prompt")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone() == ("3",)
    conn.close()
