"""What a client does with one round message: check it, claim it, run the round, reply.

Kept apart from ``client.app`` so that importing the app stays cheap: Flower starts a
fresh ClientApp process for every message, and the three SecAgg+ key-exchange stages
never reach this module (nor torch, which it pulls in).
"""

from __future__ import annotations

import logging

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.node_store import store_path
from client.policy_round import policy_round
from client.reward_round import reward_round
from client.store import PreferenceStore
from common.config import RunConfig
from common.privacy import BudgetExceeded, RoundDeclined
from common.protocol import RoundInstruction

log = logging.getLogger(__name__)


def handle_round(msg: Message, context: Context) -> Message:
    """Validate the instruction, refuse a stale or replayed one, run the round."""
    config = RunConfig.from_flower(context.run_config).on_node(context.node_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    where = f"node {context.node_id}, message {msg.metadata.message_id[:8]}"
    instruction = RoundInstruction.from_config(fitins.config, where)
    where = (
        f"node {context.node_id}, {instruction.phase} round {instruction.round} "
        f"(server round {instruction.server_round})"
    )
    arrays = parameters_to_ndarrays(fitins.parameters)
    with PreferenceStore(store_path(context, config)) as store:
        store.claim_round(instruction.run_key, instruction.server_round, where)
        run_round = policy_round if instruction.phase == "policy" else reward_round
        try:
            reply_arrays = run_round(config, store, instruction, arrays, str(context.run_id), where)
        except BudgetExceeded as exc:
            log.warning("%s: %s", where, exc)  # the figures stay on this machine
            raise RoundDeclined() from None
    # num_examples travels in clear next to the masked arrays: it is always 1, so
    # the server learns nothing about a client's data size (counts are masked).
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(reply_arrays), 1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
