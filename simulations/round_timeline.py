"""Where a round's seconds go: the server's view joined with each client's own.

The server records each exchange of a round (push to last reply, and each node's
reply time: ``timeline`` in ``metrics.jsonl``); each client records how long it took
to answer and the parts of that (``<store>.timeline.jsonl``, never sent). Joined per
round, a training round splits into

* ``train``: the clients' local work on the round (load, evaluate, train, measure),
  for the slowest client, as the round waits for it;
* ``secagg``: the clients' key exchange and masking, and the server's unmasking;
* ``waiting``: everything else (transport, scheduling, process starts, polling).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from client.round_timeline import read_timeline

TRAINING_STAGES = ("secagg:collect_masked_vectors", "train.plain")
PARTS = ("import", "load", "evaluate", "encode", "plan noise", "measure", "generate", "train")


def client_rounds(stores: Sequence[Path]) -> dict[str, list[dict]]:
    """Each client's timeline lines, by server round (Flower's message group id)."""
    by_round: dict[str, list[dict]] = defaultdict(list)
    for store in stores:
        for line in read_timeline(store):
            by_round[line["group"]].append(line)
    return by_round


def round_breakdown(entry: dict, clients: list[dict]) -> dict[str, float]:
    """One metrics line (a round) and its clients' lines -> seconds by kind of work."""
    training = [c for c in clients if c["stage"] in TRAINING_STAGES]
    local = max((c.get("handler", 0.0) + c.get("import", 0.0) for c in training), default=0.0)
    client_secagg = sum(
        max((c["seconds"] for c in clients if c["stage"] == stage["stage"]), default=0.0)
        - (local if stage["stage"] in TRAINING_STAGES else 0.0)
        for stage in entry["timeline"]
    )
    secagg = max(0.0, client_secagg) + (entry["server_seconds"] if entry["secagg"] else 0.0)
    parts = {
        part: max((c.get(part, 0.0) for c in training), default=0.0)
        for part in PARTS
        if any(part in c for c in training)
    }
    return {
        "round": entry["seconds"],
        "train": local,
        "secagg": secagg,
        "waiting": max(0.0, entry["seconds"] - local - secagg),
        **{f"client {part}": value for part, value in parts.items()},
        # A policy round's second exchange: the clients measure the aggregated candidate.
        **({"candidate measure": entry["measure_seconds"]} if "measure_seconds" in entry else {}),
    }


def round_timeline(metrics: Path, stores: Sequence[Path]) -> dict[str, dict]:
    """Median seconds per training round after the first (which loads the models), by phase."""
    if not metrics.exists():
        return {}
    entries = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    clients = client_rounds(stores)
    summary: dict[str, dict] = {}
    for phase in dict.fromkeys(e["phase"] for e in entries):
        rounds = [
            round_breakdown(e, clients.get(str(e["server_round"]), []))
            for e in entries
            if e["phase"] == phase and e["task"] == "train" and "timeline" in e
        ]
        steady = rounds[1:] or rounds
        if not steady:
            continue
        medians = {
            key: round(statistics.median(r.get(key, 0.0) for r in steady), 2) for key in steady[0]
        }
        medians["summary"] = (
            f"{medians['round']:.1f} = train {medians['train']:.1f} + SecAgg+ "
            f"{medians['secagg']:.1f} + waiting {medians['waiting']:.1f}"
            + (
                f", then {medians['candidate measure']:.1f} measuring the candidate"
                if "candidate measure" in medians
                else ""
            )
        )
        summary[phase] = medians
    return summary
