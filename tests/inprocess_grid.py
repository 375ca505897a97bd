"""A Grid that delivers messages to the real ClientApp inside the test process.

No Ray, no network: every message is deep-copied (as serialization would), handed
to ``client.app.app`` with the node's own persistent Context, and a raised
exception becomes an error reply, as Flower does. It records every message a client
sends, and can make a node drop out at a chosen stage. The SecAgg+ workflow, the
ClientApp, its mods and the round logic are all the real ones.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

RUN_ID = 4242


@dataclass
class InProcessGrid:
    node_configs: dict[int, dict]
    run_config: dict
    drop: Callable[[int, Message], bool] = lambda node, message: False
    """Return True to make ``node`` vanish (no reply) when it receives ``message``."""
    sent_by_clients: list[tuple[int, Message]] = field(default_factory=list)
    delivered: list[tuple[int, Message]] = field(default_factory=list)
    """Every message as a client received it (to replay in tests)."""

    def __post_init__(self) -> None:
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        self.contexts = {
            node: Context(RUN_ID, node, dict(cfg), RecordDict(), dict(self.run_config))
            for node, cfg in self.node_configs.items()
        }
        self.server_context = Context(RUN_ID, 0, {}, RecordDict(), dict(self.run_config))
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        """Deliver each message now; its reply waits for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if self.drop(node, message):
                continue
            delivered = self.deliver(node, message)
            try:
                reply = client_app(delivered, self.contexts[node])
                reply = Message(copy.deepcopy(reply.content), reply_to=message)
            except Exception as exc:  # Flower turns a crashing ClientApp into an error reply
                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message
                )
            # A copy: the server's legacy conversion empties the reply it reads.
            self.sent_by_clients.append(
                (
                    node,
                    Message(copy.deepcopy(reply.content), reply_to=message)
                    if not reply.has_error()
                    else reply,
                )
            )
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ANN001
        return self.pull_messages(self.push_messages(messages))

    def deliver(self, node: int, message: Message) -> Message:
        """The message as it arrives at ``node``: a copy, as serialization would make."""
        delivered = Message(
            content=copy.deepcopy(message.content),
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )
        self.delivered.append((node, copy.deepcopy(delivered)))
        return delivered
