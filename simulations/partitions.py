"""Split one preference data set into organizations, with flwr-datasets' partitioners.

``iid``                 equal random shares (``IidPartitioner`` after a seeded shuffle);
``dirichlet:ALPHA``     each value of ``partition_by`` spread over the organizations by a
                        Dirichlet(ALPHA) draw (``DirichletPartitioner``): small ALPHA,
                        very non-IID;
``by:FIELD``            one organization per value of FIELD, e.g. a source or annotator
                        column (``NaturalIdPartitioner``).

The partitioners see only a table of row indices and the partition-by column, never
the texts. :func:`skew` measures how non-IID the result is.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from client.importers import Row

MIN_PARTITION_SIZE = 10
"""Fewest comparisons a Dirichlet share may hold (flwr-datasets redraws until it does)."""


class PartitionError(ValueError):
    """A partition spec that cannot be applied to this data set."""


@dataclass(frozen=True)
class PartitionSpec:
    kind: str
    """``iid``, ``dirichlet`` or ``by``."""
    field: str | None = None
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str, partition_by: str | None = None) -> PartitionSpec:
        """``iid``, ``dirichlet:ALPHA`` (with ``partition_by``) or ``by:FIELD``."""
        kind, _, arg = text.partition(":")
        if kind == "iid" and not arg:
            return cls("iid")
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                raise PartitionError(
                    f"--partition {text!r}: expected dirichlet:ALPHA, e.g. dirichlet:0.5"
                ) from None
            if alpha <= 0:
                raise PartitionError(f"--partition {text!r}: ALPHA must be > 0")
            if not partition_by:
                raise PartitionError(
                    f"--partition {text!r} needs --partition-by FIELD (the column whose values "
                    "are spread unevenly over the organizations)"
                )
            return cls("dirichlet", partition_by, alpha)
        if kind == "by" and arg:
            return cls("by", arg)
        raise PartitionError(f"--partition {text!r}: expected iid, dirichlet:ALPHA or by:FIELD")

    def describe(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet(alpha={self.alpha:g}) over {self.field!r}"
        return f"one organization per {self.field!r}" if self.kind == "by" else "iid"


def _column(rows: list[Row], field: str) -> list[str]:
    missing = [row for row in rows if not isinstance(row.record, dict) or field not in row.record]
    if missing:
        raise missing[0].error(f"no field {field!r} to partition by")
    return [str(row.record[field]) for row in rows]


def partition(
    rows: list[Row], spec: PartitionSpec, organizations: int | None, seed: int
) -> list[list[Row]]:
    """The rows of each organization (a list per organization), reproducible by ``seed``."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # flwr-datasets' per-row progress bars
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        Partitioner,
    )

    datasets.disable_progress_bars()
    columns: dict[str, list] = {"index": list(range(len(rows)))}
    if spec.field is not None:
        columns["label"] = _column(rows, spec.field)
    table = datasets.Dataset.from_dict(columns).shuffle(seed=seed)
    partitioner: Partitioner
    if spec.kind == "by":
        values = len(set(columns["label"]))
        if organizations is not None and organizations != values:
            raise PartitionError(
                f"--partition by:{spec.field} makes {values} organizations (one per value), "
                f"but --orgs says {organizations}"
            )
        partitioner = NaturalIdPartitioner(partition_by="label")
    else:
        if organizations is None or organizations < 2:
            raise PartitionError(f"--partition {spec.kind} needs --orgs N (N >= 2)")
        if len(rows) < organizations * MIN_PARTITION_SIZE:
            raise PartitionError(
                f"{len(rows)} comparisons are too few for {organizations} organizations "
                f"(at least {MIN_PARTITION_SIZE} each)"
            )
        partitioner = (
            IidPartitioner(num_partitions=organizations)
            if spec.kind == "iid"
            else DirichletPartitioner(
                num_partitions=organizations,
                partition_by="label",
                alpha=spec.alpha,
                min_partition_size=MIN_PARTITION_SIZE,
                self_balancing=False,
                shuffle=True,
                seed=seed,
            )
        )
    partitioner.dataset = table
    try:
        count = partitioner.num_partitions
        shares = [partitioner.load_partition(k)["index"] for k in range(count)]
    except ValueError as exc:  # e.g. Dirichlet draws that never give every share its minimum
        raise PartitionError(f"--partition {spec.describe()}: {exc}") from None
    return [[rows[i] for i in sorted(share)] for share in shares]


def skew(shares: list[list[Row]], field: str) -> list[float]:
    """Per organization, the total-variation distance between its distribution of
    ``field`` and the whole data set's: 0 for an IID share, up to 1."""
    overall = Counter(v for share in shares for v in _column(share, field))
    total = sum(overall.values())
    out = []
    for share in shares:
        local = Counter(_column(share, field))
        n = sum(local.values())
        out.append(0.5 * sum(abs(local[v] / n - overall[v] / total) for v in overall))
    return out
