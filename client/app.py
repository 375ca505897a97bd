"""The ClientApp: thin message handlers over the client's round logic.

Rounds arrive on Flower's legacy ``FitIns`` records because SecAgg+ ships on the
legacy path: ``train`` runs under ``secaggplus_mod`` (the reply's arrays are masked
before they leave this process), ``train.plain`` is the same round without secure
aggregation, for benchmarks and for federations that explicitly turn it off.
"""

from __future__ import annotations

import logging

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.reward_round import reward_round
from client.store import PreferenceStore
from common.config import RunConfig
from common.protocol import RoundInstruction

log = logging.getLogger(__name__)
app = ClientApp()


def store_path(context: Context, config: RunConfig) -> str:
    """The node's ``store`` setting, else the run config's template for it."""
    if "store" in context.node_config:
        return str(context.node_config["store"])
    partition = context.node_config.get("partition-id", 0)
    return config.client.store.replace("{partition-id}", str(partition))


def _handle_round(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flower(context.run_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    where = f"node {context.node_id}, message {msg.metadata.message_id[:8]}"
    instruction = RoundInstruction.from_config(fitins.config, where)
    where = f"node {context.node_id}, {instruction.phase} round {instruction.round}"
    arrays = parameters_to_ndarrays(fitins.parameters)
    with PreferenceStore(store_path(context, config)) as store:
        reply_arrays = reward_round(config, store, instruction, arrays, str(context.run_id), where)
    # num_examples travels in clear next to the masked arrays: it is always 1, so
    # the server learns nothing about a client's data size (counts are masked).
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(reply_arrays), 1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """A round under SecAgg+ (the mod runs the key exchange and masks the reply)."""
    return _handle_round(msg, context)


@app.train("plain")
def train_plain(msg: Message, context: Context) -> Message:
    """The same round without secure aggregation: the server sees this update."""
    return _handle_round(msg, context)
