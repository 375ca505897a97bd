"""A researcher's own preference data as simulated organizations.

Either one file (or data set) per organization, or one data set split by a
partitioner (:mod:`simulations.partitions`). The test set is a file of its own
(``--test``) or a seeded share held out before anything is partitioned, so no
organization ever trains on it. Every row is validated by the partners' importer
first (errors name file and line or row), and each organization's share is written
as a JSONL file and imported into its store by that same importer.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from client.importers import Row, comparison_of, import_file, read_rows
from client.store import NewComparison, PreferenceStore, content_hash
from simulations.partitions import PartitionError, PartitionSpec, partition, skew

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataOptions:
    files: tuple[Path, ...]
    """One per organization, or one to partition."""
    partition: str | None = None
    """``iid``, ``dirichlet:ALPHA`` or ``by:FIELD`` (see :mod:`simulations.partitions`)."""
    partition_by: str | None = None
    organizations: int | None = None
    test: Path | None = None
    test_fraction: float = 0.1
    """Held out of the data when there is no ``test`` file."""
    seed: int = 0


@dataclass
class UserData:
    """The organizations' rows, the test comparisons, and what the split looks like."""

    options: DataOptions
    organizations: list[list[Row]]
    names: list[str]
    test: list[NewComparison]
    description: dict = field(default_factory=dict)

    @classmethod
    def load(cls, options: DataOptions) -> UserData:
        if not options.files:
            raise PartitionError("--data needs at least one file or data set")
        if not 0 < options.test_fraction < 1 and options.test is None:
            raise PartitionError("--test-fraction must be in (0, 1)")
        per_file = [read_rows(path) for path in options.files]
        for rows in per_file:
            for row in rows:
                comparison_of(row)  # validate everything before any store is touched
        test_rows: list[Row] = []
        if options.test is not None:
            test = [comparison_of(row) for row in read_rows(options.test)]
        else:
            rng = random.Random(options.seed)
            kept = []
            for rows in per_file:
                order = list(range(len(rows)))
                rng.shuffle(order)
                cut = round(options.test_fraction * len(rows))
                test_rows += [rows[i] for i in sorted(order[:cut])]
                kept.append([rows[i] for i in sorted(order[cut:])])
            per_file = kept
            test = [comparison_of(row) for row in test_rows]
        if not test:
            raise PartitionError("the test set is empty")

        if options.partition is None:
            if len(per_file) < 2:
                raise PartitionError(
                    "one --data file is one organization: give one per organization, or "
                    "--partition iid|dirichlet:ALPHA|by:FIELD with --orgs N to split it"
                )
            if options.organizations not in (None, len(per_file)):
                raise PartitionError(
                    f"--orgs {options.organizations} but {len(per_file)} --data files "
                    "(one organization each)"
                )
            organizations = per_file
            names = [path.stem for path in options.files]
            description = {"split": "one organization per file"}
        else:
            if len(per_file) != 1:
                raise PartitionError("--partition splits one data set; give exactly one --data")
            spec = PartitionSpec.parse(options.partition, options.partition_by)
            organizations = partition(per_file[0], spec, options.organizations, options.seed)
            names = [f"org-{k}" for k in range(len(organizations))]
            description = {"split": spec.describe()}
            if spec.field is not None:
                description["skew_total_variation"] = skew(organizations, spec.field)
        empty = [names[k] for k, rows in enumerate(organizations) if not rows]
        if empty:
            raise PartitionError(f"organizations without comparisons: {', '.join(empty)}")
        data = cls(options, organizations, names, test, description)
        data.description.update(
            files=[str(p) for p in options.files],
            test=str(options.test) if options.test else f"{options.test_fraction:.0%} held out",
            comparisons_per_organization=[len(rows) for rows in organizations],
            test_comparisons=len(test),
            test_also_in_training=data.leaked_test_comparisons(),
        )
        if data.description["test_also_in_training"]:
            log.warning(
                "%d test comparisons also appear in the organizations' data: test accuracy "
                "will overstate what the models learned",
                data.description["test_also_in_training"],
            )
        return data

    def leaked_test_comparisons(self) -> int:
        def key(c: NewComparison) -> str:
            return content_hash(c.prompt, c.chosen, c.rejected)

        training = {key(comparison_of(r)) for rows in self.organizations for r in rows}
        return sum(key(c) in training for c in self.test)

    def fill_stores(self, data_dir: Path, stores_dir: Path) -> list[Path]:
        """Each organization's rows as ``data_dir/<name>.jsonl``, imported into its store
        by the partners' importer; returns the store paths (``org-<k>.sqlite``)."""
        for folder in (data_dir, stores_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        paths = []
        for k, rows in enumerate(self.organizations):
            share = data_dir / f"org-{k}.jsonl"
            with share.open("w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row.record, ensure_ascii=False, default=str) + "\n")
            store_path = stores_dir / f"org-{k}.sqlite"
            with PreferenceStore(store_path) as store:
                report = import_file(store, share)
            log.info("%s: %d comparisons imported into %s", self.names[k], report.added, store_path)
            paths.append(store_path)
        return paths
