"""The local preference store: one SQLite file (WAL) per organization.

Holds prompts, responses, comparisons and the privacy ledger. Nothing in it ever
leaves the machine; the ClientApp reads it to train, the importers and (later) the
labeling page write to it. Every write is one transaction: a failed import or a
crash leaves what was stored before intact.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.privacy import DPEvent

SCHEMA_VERSION = 3
MECHANISMS = ("training", "statistics")
UNITS = ("comparison", "prompt")


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


_MIGRATIONS = {
    # 1 -> 2: the ledger says where each DP run's randomness came from; every run
    # before version 2 used torch's seeded generators.
    1: (
        "ALTER TABLE privacy_ledger ADD COLUMN randomness TEXT NOT NULL DEFAULT 'seeded'"
        " CHECK (randomness IN ('seeded', 'secure'))",
    ),
    # 2 -> 3: the ledger names each mechanism and its privacy unit; before version 3
    # only training was charged, and it is read back as comparison-level (the
    # conservative reading: a PPO prompt is a smaller unit than its comparisons).
    2: (
        "ALTER TABLE privacy_ledger ADD COLUMN mechanism TEXT NOT NULL DEFAULT 'training'"
        f" CHECK (mechanism IN ({_one_of(MECHANISMS)}))",
        "ALTER TABLE privacy_ledger ADD COLUMN unit TEXT NOT NULL DEFAULT 'comparison'"
        f" CHECK (unit IN ({_one_of(UNITS)}))",
    ),
}
SOURCES = ("human", "import", "simulated", "ai_judge")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    chosen_id INTEGER NOT NULL REFERENCES responses(id),
    rejected_id INTEGER NOT NULL REFERENCES responses(id),
    annotator TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ({_one_of(SOURCES)})),
    origin TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    CHECK (chosen_id != rejected_id)
);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    status TEXT NOT NULL CHECK (status IN ('pending', 'committed')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    randomness TEXT NOT NULL DEFAULT 'seeded' CHECK (randomness IN ('seeded', 'secure')),
    mechanism TEXT NOT NULL CHECK (mechanism IN ({_one_of(MECHANISMS)})),
    unit TEXT NOT NULL CHECK (unit IN ({_one_of(UNITS)}))
);
CREATE TABLE IF NOT EXISTS label_pairs (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    first_id INTEGER NOT NULL REFERENCES responses(id),
    second_id INTEGER NOT NULL REFERENCES responses(id),
    rank INTEGER NOT NULL,
    selection TEXT NOT NULL CHECK (selection IN ('uncertain', 'random')),
    margin REAL,
    labels_wanted INTEGER NOT NULL CHECK (labels_wanted IN (1, 2)),
    created_at TEXT NOT NULL,
    UNIQUE (first_id, second_id),
    CHECK (first_id < second_id)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES label_pairs(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('first', 'second', 'tie', 'skip')),
    shown_left_id INTEGER NOT NULL REFERENCES responses(id),
    reason TEXT NOT NULL,
    comparison_id INTEGER REFERENCES comparisons(id),
    created_at TEXT NOT NULL,
    undone_at TEXT
);
CREATE TABLE IF NOT EXISTS served_rounds (
    run_key TEXT PRIMARY KEY,
    server_round INTEGER NOT NULL,
    served_at TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The store file is unusable (wrong schema version, not a store)."""


class StaleRound(ValueError):
    """A round instruction this client has already served, or an older one (a replay)."""


@dataclass(frozen=True)
class NewComparison:
    """A comparison to add: ``chosen`` was preferred over ``rejected`` for ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    annotator: str
    origin: str = ""
    """Where it came from, for error messages and audits (``file.jsonl:12``)."""


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt: str
    chosen: str
    rejected: str
    annotator: str
    source: str
    hash: str


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    run_id: str
    phase: str
    round: int
    event: DPEvent
    status: str
    randomness: str
    """``secure`` or ``seeded``: where the run's noise and sampling came from."""
    mechanism: str
    """``training`` (DP-SGD steps) or ``statistics`` (a noised release of figures)."""
    unit: str
    """What one privacy unit is: a ``comparison`` or a ``prompt``."""


def content_hash(*parts: str) -> str:
    """SHA-256 over the parts, length-prefixed so that ("ab", "c") != ("a", "bc")."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def is_heldout(hash_hex: str, fraction: float) -> bool:
    """Stable split by content hash: the same comparison is always on the same side."""
    return int(hash_hex[:12], 16) / 16**12 < fraction


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PreferenceStore:
    """A client's SQLite store. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)  # idempotent; executescript commits by itself
            with self.transaction():
                row = self._conn.execute(
                    "SELECT value FROM meta WHERE key='schema_version'"
                ).fetchone()
                if row is None:
                    self._conn.execute(
                        "INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                else:
                    self._migrate(int(row["value"]))
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: not a fedrlhf store ({exc})") from exc

    def _migrate(self, version: int) -> None:
        """Bring an older store up to :data:`SCHEMA_VERSION`, in the open transaction."""
        if not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version}, this fedrlhf reads {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION:
            return
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                self._conn.execute(statement)
        self._conn.execute(
            "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- prompts, responses, comparisons -------------------------------------------

    def _prompt_id(self, text: str) -> int:
        h = content_hash("prompt", text)
        self._conn.execute(
            "INSERT OR IGNORE INTO prompts(text, hash, created_at) VALUES (?, ?, ?)",
            (text, h, _now()),
        )
        return self._conn.execute("SELECT id FROM prompts WHERE hash=?", (h,)).fetchone()["id"]

    def _response_id(self, prompt_id: int, prompt: str, text: str) -> int:
        h = content_hash("response", prompt, text)
        self._conn.execute(
            "INSERT OR IGNORE INTO responses(prompt_id, text, hash, created_at) VALUES (?, ?, ?, ?)",
            (prompt_id, text, h, _now()),
        )
        return self._conn.execute("SELECT id FROM responses WHERE hash=?", (h,)).fetchone()["id"]

    def add_prompts(self, texts: Iterable[str]) -> int:
        """Add prompts (idempotent); returns how many were new."""
        with self.transaction():
            before = self._count("prompts")
            for text in texts:
                self._prompt_id(text)
            return self._count("prompts") - before

    def add_comparisons(self, items: Iterable[NewComparison], source: str) -> tuple[int, int]:
        """Add comparisons in one transaction; returns (added, already present).

        Idempotent: a comparison is identified by the hash of its prompt, chosen and
        rejected texts and its annotator.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        added = duplicates = 0
        with self.transaction():
            for item in items:
                if self.insert_comparison(item, source) is None:
                    duplicates += 1
                else:
                    added += 1
        return added, duplicates

    def insert_comparison(self, item: NewComparison, source: str) -> int | None:
        """Insert one comparison inside the caller's :meth:`transaction`; returns its id,
        or None if the same annotator already gave this comparison."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        h = content_hash("comparison", item.prompt, item.chosen, item.rejected, item.annotator)
        if self._conn.execute("SELECT 1 FROM comparisons WHERE hash=?", (h,)).fetchone():
            return None
        prompt_id = self._prompt_id(item.prompt)
        chosen_id = self._response_id(prompt_id, item.prompt, item.chosen)
        rejected_id = self._response_id(prompt_id, item.prompt, item.rejected)
        cursor = self._conn.execute(
            "INSERT INTO comparisons(prompt_id, chosen_id, rejected_id, annotator, source,"
            " origin, hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (prompt_id, chosen_id, rejected_id, item.annotator, source, item.origin, h, _now()),
        )
        return int(cursor.lastrowid)

    def comparisons(self, split: str = "all", heldout_fraction: float = 0.0) -> list[Comparison]:
        """Comparisons in insertion order; ``split`` is ``all``, ``train`` or ``heldout``."""
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be all, train or heldout, got {split!r}")
        rows = self._conn.execute(
            "SELECT c.id, p.text AS prompt, rc.text AS chosen, rr.text AS rejected,"
            " c.annotator, c.source, c.hash FROM comparisons c"
            " JOIN prompts p ON p.id = c.prompt_id"
            " JOIN responses rc ON rc.id = c.chosen_id"
            " JOIN responses rr ON rr.id = c.rejected_id ORDER BY c.id"
        ).fetchall()
        out = [Comparison(**dict(r)) for r in rows]
        if split == "all":
            return out
        want_heldout = split == "heldout"
        return [c for c in out if is_heldout(c.hash, heldout_fraction) == want_heldout]

    def add_candidates(self, prompt: str, responses: Iterable[str]) -> list[int]:
        """Add a prompt's candidate responses for labeling (idempotent); returns their ids."""
        with self.transaction():
            prompt_id = self._prompt_id(prompt)
            return [self._response_id(prompt_id, prompt, text) for text in responses]

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """A read-only query, for modules that keep their own tables here (labeling)."""
        return self._conn.execute(sql, params).fetchall()

    def prompts(self) -> list[str]:
        return [r["text"] for r in self._conn.execute("SELECT text FROM prompts ORDER BY id")]

    def _count(self, table: str) -> int:
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def counts(self) -> dict[str, int]:
        return {
            t: self._count(t) for t in ("prompts", "responses", "comparisons", "privacy_ledger")
        }

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, for tests that prove nothing was changed or lost."""
        tables = (
            "meta",
            "prompts",
            "responses",
            "comparisons",
            "privacy_ledger",
            "label_pairs",
            "labels",
        )
        return {
            t: [tuple(r) for r in self._conn.execute(f"SELECT * FROM {t} ORDER BY 1")]
            for t in tables
        }

    # -- privacy ledger ---------------------------------------------------------------

    def begin_charge(
        self,
        run_id: str,
        phase: str,
        round_: int,
        event: DPEvent,
        randomness: str,
        mechanism: str,
        unit: str,
    ) -> int:
        """Record a DP run *before* it starts, charged in full until :meth:`commit_charge`.

        ``randomness`` is ``secure`` or ``seeded`` (:mod:`common.dp_randomness`);
        ``mechanism`` one of :data:`MECHANISMS`, ``unit`` one of :data:`UNITS`.

        A client that dies mid-training keeps this pending entry, so the ledger never
        counts less than was spent.
        """
        with self.transaction():
            cursor = self._conn.execute(
                "INSERT INTO privacy_ledger(run_id, phase, round, noise_multiplier, sample_rate,"
                " steps, status, created_at, updated_at, randomness, mechanism, unit)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                (
                    run_id,
                    phase,
                    round_,
                    event.noise_multiplier,
                    event.sample_rate,
                    event.steps,
                    _now(),
                    _now(),
                    randomness,
                    mechanism,
                    unit,
                ),
            )
            return int(cursor.lastrowid)

    def commit_charge(self, entry_id: int, steps_taken: int) -> None:
        """Mark a DP run finished with the number of steps actually taken."""
        with self.transaction():
            row = self._conn.execute(
                "SELECT steps, status FROM privacy_ledger WHERE id=?", (entry_id,)
            ).fetchone()
            if row is None or row["status"] != "pending":
                raise ValueError(f"ledger entry {entry_id} is not a pending charge")
            if steps_taken > row["steps"]:
                raise ValueError(
                    f"ledger entry {entry_id}: {steps_taken} steps > {row['steps']} planned"
                )
            self._conn.execute(
                "UPDATE privacy_ledger SET steps=?, status='committed', updated_at=? WHERE id=?",
                (steps_taken, _now(), entry_id),
            )

    def ledger(self) -> list[LedgerEntry]:
        rows = self._conn.execute("SELECT * FROM privacy_ledger ORDER BY id").fetchall()
        return [
            LedgerEntry(
                id=r["id"],
                run_id=r["run_id"],
                phase=r["phase"],
                round=r["round"],
                event=DPEvent(r["noise_multiplier"], r["sample_rate"], r["steps"]),
                status=r["status"],
                randomness=r["randomness"],
                mechanism=r["mechanism"],
                unit=r["unit"],
            )
            for r in rows
        ]

    def privacy_events(self) -> list[DPEvent]:
        """Every DP run on this store's data, pending ones included (charged in full)."""
        return [e.event for e in self.ledger()]

    # -- replay protection -------------------------------------------------------------

    def claim_round(self, run_key: str, server_round: int, where: str) -> None:
        """Record that this client serves ``server_round`` of the run ``run_key``.

        The server numbers every round it sends, failed attempts included, and never
        reuses a number (it persists the counter before sending). A number at or below
        the last one served is a stale or replayed message: refused before any data is
        touched, so a replay cannot make the client train (and spend budget) twice.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT server_round FROM served_rounds WHERE run_key=?", (run_key,)
            ).fetchone()
            if row is not None and server_round <= row["server_round"]:
                raise StaleRound(
                    f"{where}: server round {server_round} of run {run_key} refused as stale or "
                    f"replayed (this client already served round {row['server_round']})"
                )
            conn.execute(
                "INSERT INTO served_rounds(run_key, server_round, served_at) VALUES (?, ?, ?) "
                "ON CONFLICT(run_key) DO UPDATE SET server_round=excluded.server_round, "
                "served_at=excluded.served_at",
                (run_key, server_round, _now()),
            )
