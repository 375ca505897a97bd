"""Run one round over the grid: through SecAgg+, or plainly for comparison.

Both return the mean of the survivors' reply arrays, who survived, who dropped out
(by node id, with the stage and reason), and the payload bytes that crossed the
wire per client. With SecAgg+ the server only ever holds the mean.

SecAgg+ ships on Flower's legacy path: :class:`flwr.server.workflow.SecAggPlusWorkflow`
asks a legacy ``Strategy`` which clients to send which ``FitIns`` and hands it the
unmasked mean. :class:`_PresetRound` is that strategy for one round whose clients
and instructions the phase driver has already chosen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.config import FederationConfig
from common.wire import TensorSpec, WireError
from server.share_graph import ShareGraph, share_graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dropout:
    node_id: int
    stage: str
    reason: str


@dataclass
class StageTiming:
    """One exchange of a round: push to the last reply, and each node's reply time."""

    stage: str
    seconds: float
    node_seconds: dict[int, float] = field(default_factory=dict)
    """Seconds from the push to each node's reply; a node that never replied is absent."""

    def to_json(self) -> dict[str, Any]:
        replies = sorted(self.node_seconds.values())
        return {
            "stage": self.stage,
            "seconds": round(self.seconds, 3),
            "first_reply": round(replies[0], 3) if replies else None,
            "median_reply": round(replies[len(replies) // 2], 3) if replies else None,
            "nodes": {str(n): round(s, 3) for n, s in sorted(self.node_seconds.items())},
        }


@dataclass
class RoundOutcome:
    sampled: list[int]
    survivors: list[int] = field(default_factory=list)
    dropouts: list[Dropout] = field(default_factory=list)
    mean: list[np.ndarray] | None = None
    """Mean of the survivors' arrays; None when the round failed."""
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    share_graph: ShareGraph | None = None
    """SecAgg+'s shares and threshold for this round (None without SecAgg+)."""
    stages: list[StageTiming] = field(default_factory=list)
    """Every exchange of the round in order; ``seconds`` minus their sum is the
    server's own work (unmasking, aggregation)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays, byte strings and scalars in a message (protobuf framing aside)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for config in content.config_records.values():
        for value in config.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    for metrics in content.metric_records.values():
        total += 8 * sum(len(v) if isinstance(v, list) else 1 for v in metrics.values())
    return total


MASKED_VECTOR_STAGE = f"secagg:{Stage.COLLECT_MASKED_VECTORS}"
NPY_HEADER_ALLOWANCE = 1024
"""Bytes a serialized array may carry beyond its values (the .npy header)."""


def check_masked_vector(reply: Message, spec: Sequence[TensorSpec]) -> None:
    """Refuse a masked vector that does not have the layout of this round's replies.

    Flower's SecAgg+ server adds the masked vectors up as they come: a wrong shape is
    broadcast into the sum (silently corrupting it) and a wrong length raises and
    kills the ServerApp. Sizes are checked before anything is deserialized.
    """
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    blobs = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
    if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
        raise WireError("masked vector missing")
    expected = [("weight factor", (1,)), *((s.name, s.shape) for s in spec)]
    if len(blobs) != len(expected):
        raise WireError(f"{len(blobs)} masked tensors, expected {len(expected)}")
    for blob, (name, shape) in zip(blobs, expected, strict=True):
        limit = 8 * int(np.prod(shape)) + NPY_HEADER_ALLOWANCE
        if len(blob) > limit:
            raise WireError(f"masked tensor {name!r} is {len(blob)} bytes, at most {limit} fit")
        array = bytes_to_ndarray(blob)
        if array.shape != shape or array.dtype.kind not in "iu":
            raise WireError(
                f"masked tensor {name!r} is {array.dtype}{list(array.shape)}, "
                f"expected integers of shape {list(shape)}"
            )


class ObservedGrid:
    """A grid that times every exchange and records every reply error, missing reply
    and payload size.

    It pulls replies every ``poll_interval`` seconds: Flower's own
    ``send_and_receive`` sleeps 3 s between pulls, which a SecAgg+ round (four
    exchanges) pays up to four times. With ``reply_spec`` it also checks the masked
    vectors of a SecAgg+ round and drops a reply that fails (SecAgg+ then unmasks
    around that client, as for any client lost at that stage).
    """

    def __init__(
        self,
        grid: Grid,
        outcome: RoundOutcome,
        poll_interval: float,
        reply_spec: Sequence[TensorSpec] | None = None,
    ) -> None:
        self._grid = grid
        self._outcome = outcome
        self._poll_interval = poll_interval
        self._reply_spec = reply_spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = _stage(messages[0]) if messages else "?"
        for m in messages:
            down = self._outcome.bytes_down
            down[m.metadata.dst_node_id] = down.get(m.metadata.dst_node_id, 0) + payload_bytes(
                m.content
            )
        replies = self._exchange(messages, stage, timeout)
        answered, accepted = set(), []
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self._outcome.dropouts.append(Dropout(node, stage, str(reply.error.reason)))
                accepted.append(reply)
                continue
            self._outcome.bytes_up[node] = self._outcome.bytes_up.get(node, 0) + payload_bytes(
                reply.content
            )
            if stage == MASKED_VECTOR_STAGE and self._reply_spec is not None:
                try:
                    check_masked_vector(reply, self._reply_spec)
                except WireError as exc:
                    log.warning("refused the masked vector of node %d: %s", node, exc)
                    self._outcome.dropouts.append(Dropout(node, stage, f"reply refused: {exc}"))
                    continue
            accepted.append(reply)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self._outcome.dropouts.append(
                    Dropout(m.metadata.dst_node_id, stage, f"no reply within {timeout} s")
                )
        return accepted

    def _exchange(self, messages: list[Message], stage: str, timeout: float | None) -> list:
        """Push, then pull until every message is answered or ``timeout`` passes."""
        start = time.monotonic()
        ids = list(self._grid.push_messages(messages))
        nodes = dict(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
        timing = StageTiming(stage, 0.0)
        replies: list[Message] = []
        while nodes:
            for reply in self._grid.pull_messages(list(nodes)):
                node = nodes.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    timing.node_seconds[node] = time.monotonic() - start
                    replies.append(reply)
            if not nodes or (timeout is not None and time.monotonic() - start >= timeout):
                break
            time.sleep(self._poll_interval)
        timing.seconds = time.monotonic() - start
        self._outcome.stages.append(timing)
        return replies


def _stage(message: Message) -> str:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return f"secagg:{configs[Key.STAGE]}"
    return message.metadata.message_type


class _PresetRound(Strategy):
    """A legacy strategy for one secure round with preset clients and instructions."""

    def __init__(
        self, grid: Grid, run_id: int, node_ids: list[int], config: dict[str, Any]
    ) -> None:
        self.grid, self.run_id, self.node_ids, self.config = grid, run_id, node_ids, config
        self.mean: list[np.ndarray] | None = None
        self.survivors: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return [
            (GridClientProxy(node, self.grid, self.run_id), FitIns(parameters, dict(self.config)))
            for node in self.node_ids
        ]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        # SecAgg+ has put the unmasked mean into every result.
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.survivors = sorted(proxy.node_id for proxy, _ in results)
        return None, {}

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with a fix for clients lost before they shared keys.

    Flower 1.41 lists every sampled node that is not active at the unmask stage as
    "dead" and asks the survivors for its key shares. A node that left during the
    setup or share-keys stage never sent shares, so the survivors fail with
    ``KeyError`` and the whole round is lost. Such a node masked nothing, so nothing
    of it needs unmasking: from the masked-vector stage on, "sampled" means "shared
    its keys".
    """

    def collect_masked_vectors_stage(self, grid, context, state):  # noqa: ANN001, ANN201
        state.sampled_node_ids = set(state.active_node_ids)
        return super().collect_masked_vectors_stage(grid, context, state)


def run_secure_round(
    grid: Grid,
    context: Context,
    node_ids: list[int],
    config: dict[str, Any],
    arrays: list[np.ndarray],
    federation: FederationConfig,
    server_round: int,
    reply_spec: Sequence[TensorSpec],
) -> RoundOutcome:
    """One round through SecAgg+; the server learns only the survivors' mean.

    ``reply_spec`` is the layout every client's (masked) reply must have. Whatever a
    client sends, the round ends with a mean or with ``mean=None`` (failed, for the
    caller to retry), never with an exception that would stop the server.
    """
    outcome = RoundOutcome(sampled=sorted(node_ids))
    start = time.perf_counter()
    observed = ObservedGrid(grid, outcome, federation.poll_interval, reply_spec)
    strategy = _PresetRound(observed, context.run_id, node_ids, config)  # type: ignore[arg-type]
    legacy = LegacyContext(context, config=LegacyServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True
    )
    graph = outcome.share_graph = share_graph(len(node_ids), federation)
    workflow = _SecAggPlus(
        # Flower reads a float as a fraction of the sampled clients, an int as a count.
        num_shares=1.0 if graph.shares >= len(node_ids) else graph.shares,
        reconstruction_threshold=graph.threshold,
        max_weight=1.0,  # every client has weight 1 (num_examples = 1)
        clipping_range=federation.secagg_clipping_range,
        quantization_range=federation.secagg_quantization_range,
        timeout=federation.round_timeout,
    )
    try:
        workflow(observed, legacy)  # type: ignore[arg-type]
    except Exception as exc:  # a broken or hostile peer must not stop the server
        log.error("secure round %d failed inside SecAgg+: %r", server_round, exc)
        outcome.seconds = time.perf_counter() - start
        return outcome
    outcome.mean = strategy.mean
    outcome.survivors = strategy.survivors
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_plain_round(
    grid: Grid,
    node_ids: list[int],
    config: dict[str, Any],
    arrays: list[np.ndarray],
    federation: FederationConfig,
    server_round: int,
    validate: Callable[[list[np.ndarray], str], None],
) -> RoundOutcome:
    """The same round without secure aggregation: each update is seen in clear.

    Each reply is checked with ``validate(arrays, where)`` (which raises on bad
    input); a refused reply counts as a dropout and is left out of the mean.
    """
    outcome = RoundOutcome(sampled=sorted(node_ids))
    start = time.perf_counter()
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(arrays), dict(config)), True
    )
    messages = [
        Message(
            content=content,
            dst_node_id=node,
            message_type="train.plain",
            group_id=str(server_round),
        )
        for node in node_ids
    ]
    replies = ObservedGrid(grid, outcome, federation.poll_interval).send_and_receive(
        messages, timeout=federation.round_timeout
    )
    collected = []
    for reply in replies:
        if reply.has_error():
            continue
        node = reply.metadata.src_node_id
        try:
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
            reply_arrays = parameters_to_ndarrays(fitres.parameters)
            validate(reply_arrays, f"reply of node {node}, round {server_round}")
        except Exception as exc:  # a hostile or broken reply must not stop the round
            log.warning("refused reply: %s", exc)
            outcome.dropouts.append(Dropout(node, "train.plain", f"reply refused: {exc}"))
            continue
        collected.append(reply_arrays)
        outcome.survivors.append(node)
    outcome.survivors.sort()
    if collected:
        outcome.mean = [
            np.mean([c[i].astype(np.float64) for c in collected], axis=0)
            for i in range(len(collected[0]))
        ]
    outcome.seconds = time.perf_counter() - start
    return outcome
