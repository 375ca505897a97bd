"""The ClientApp: thin message handlers over the client's round logic.

Rounds arrive on Flower's legacy ``FitIns`` records because SecAgg+ ships on the
legacy path: ``train`` runs under ``secaggplus_mod`` (the reply's arrays are masked
before they leave this process), ``train.plain`` is the same round without secure
aggregation, for benchmarks and for federations that explicitly turn it off.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.round_timeline import timed, timeline_mod
from common.operator_logging import configure_client_logging

configure_client_logging()
app = ClientApp()


def _handle_round(msg: Message, context: Context) -> Message:
    # Imported on first use: the SecAgg+ key-exchange messages (3 of 4 per round, each
    # in a fresh process in a deployment) are answered by the mod without torch.
    with timed("import"):
        from client.round_handler import handle_round
    with timed("handler"):
        return handle_round(msg, context)


@app.train(mods=[timeline_mod, secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """A round under SecAgg+ (the mod runs the key exchange and masks the reply)."""
    return _handle_round(msg, context)


@app.train("plain", mods=[timeline_mod])
def train_plain(msg: Message, context: Context) -> Message:
    """The same round without secure aggregation: the server sees this update."""
    return _handle_round(msg, context)
