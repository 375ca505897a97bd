"""Splitting one data set into organizations with flwr-datasets' partitioners."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from client.importers import Row
from simulations.partitions import PartitionError, PartitionSpec, partition, skew

TOPICS = ["cooking", "money", "code", "fitness"]


def rows(n: int = 400) -> list[Row]:
    return [
        Row(
            Path("prefs.jsonl"),
            i + 1,
            "line",
            {
                "prompt": f"question {i}",
                "chosen": "good",
                "rejected": "bad",
                "topic": TOPICS[i % len(TOPICS)],
                "source": f"team-{i % 3}",
            },
        )
        for i in range(n)
    ]


def numbers(shares: list[list[Row]]) -> list[list[int]]:
    return [[r.number for r in share] for share in shares]


def test_iid_shares_are_equal_disjoint_complete_and_seeded():
    data = rows()
    shares = partition(data, PartitionSpec.parse("iid"), 4, seed=1)
    assert [len(s) for s in shares] == [100, 100, 100, 100]
    seen = [n for share in numbers(shares) for n in share]
    assert sorted(seen) == list(range(1, 401))
    # Shuffled before sharding: not the contiguous blocks of the file.
    assert numbers(shares)[0] != list(range(1, 101))
    assert numbers(partition(data, PartitionSpec.parse("iid"), 4, seed=1)) == numbers(shares)
    assert numbers(partition(data, PartitionSpec.parse("iid"), 4, seed=2)) != numbers(shares)
    assert max(skew(shares, "topic")) < 0.1


def test_dirichlet_skews_the_field_more_as_alpha_falls():
    data = rows()
    skews = {}
    for alpha in (0.1, 100.0):
        spec = PartitionSpec.parse(f"dirichlet:{alpha}", partition_by="topic")
        shares = partition(data, spec, 4, seed=0)
        assert sorted(n for share in numbers(shares) for n in share) == list(range(1, 401))
        assert min(len(s) for s in shares) >= 10
        again = partition(data, spec, 4, seed=0)
        assert numbers(again) == numbers(shares)
        skews[alpha] = sum(skew(shares, "topic")) / 4
    assert skews[0.1] > 0.3 > skews[100.0]


def test_natural_ids_make_one_organization_per_value():
    shares = partition(rows(), PartitionSpec.parse("by:source"), None, seed=0)
    assert len(shares) == 3
    for share in shares:
        assert len({r.record["source"] for r in share}) == 1
    assert Counter(len(s) for s in shares) == Counter({134: 1, 133: 2})
    assert skew(shares, "source") == pytest.approx([2 / 3] * 3, abs=0.01)


@pytest.mark.parametrize(
    ("spec", "partition_by", "orgs", "message"),
    [
        ("dirichlet:0.5", None, 3, "needs --partition-by"),
        ("dirichlet:x", "topic", 3, "expected dirichlet:ALPHA"),
        ("dirichlet:-1", "topic", 3, "must be > 0"),
        ("shards", None, 3, "expected iid, dirichlet:ALPHA or by:FIELD"),
        ("iid", None, None, "needs --orgs"),
        ("by:source", None, 5, "makes 3 organizations"),
        ("by:colour", None, None, "no field 'colour'"),
        ("iid", None, 50, "too few"),
    ],
)
def test_bad_partition_requests_are_refused_clearly(spec, partition_by, orgs, message):
    with pytest.raises((PartitionError, ValueError), match=message):
        partition(rows(), PartitionSpec.parse(spec, partition_by), orgs, seed=0)


def test_a_row_without_the_partition_field_is_named():
    data = rows(40)
    del data[6].record["topic"]
    spec = PartitionSpec.parse("dirichlet:1.0", partition_by="topic")
    with pytest.raises(ValueError, match=r"prefs.jsonl:7: no field 'topic'"):
        partition(data, spec, 2, seed=0)
