"""Where a client's seconds go in each exchange of a round, kept on the client.

:func:`timeline_mod` (the ClientApp's outermost mod) times each message the node
answers; inside the round, :func:`timed` marks its parts (``load``, ``evaluate``,
``train``). What is left of the round's handler is bookkeeping; what is left of the
whole exchange is SecAgg+'s key work and masking. Each exchange becomes one JSON line
in ``<store>.timeline.jsonl`` beside the partner's store. It is not sent: how long a
client trains tells how much data it holds, which SecAgg+ hides.

No torch here: the three key-exchange stages of a round never import it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.node_store import store_path
from common.config import ConfigError, RunConfig

_parts: dict[str, float] = {}


@contextmanager
def timed(part: str) -> Iterator[None]:
    """Add the seconds of ``part`` to the exchange being answered."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _parts[part] = _parts.get(part, 0.0) + time.perf_counter() - start


def timeline_path(store: str | Path) -> Path:
    return Path(f"{store}.timeline.jsonl")


def _stage(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return f"secagg:{configs[Key.STAGE]}"
    return msg.metadata.message_type


def timeline_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Answer the message, then append how long it took (and its parts) to the timeline."""
    _parts.clear()
    stage = _stage(msg)  # before SecAgg+'s mod takes its record out of the message
    start = time.perf_counter()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - start
    try:
        path = timeline_path(store_path(context, RunConfig.from_flower(context.run_config)))
    except ConfigError:
        return reply  # the round itself has said what is wrong with the config
    line = {
        "run_id": context.run_id,
        "group": msg.metadata.group_id,
        "stage": stage,
        "seconds": round(seconds, 4),
        **{part: round(value, 4) for part, value in _parts.items()},
    }
    if path.parent.is_dir():
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")
    return reply


def read_timeline(store: str | Path) -> list[dict]:
    path = timeline_path(store)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
