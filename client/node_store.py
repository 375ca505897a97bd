"""Which store a node serves: its node config's ``store``, else the run config's template."""

from __future__ import annotations

from flwr.app import Context

from common.config import RunConfig


def store_path(context: Context, config: RunConfig) -> str:
    """The node's ``store`` setting, else ``client.store`` with its ``{partition-id}``."""
    if "store" in context.node_config:
        return str(context.node_config["store"])
    partition = context.node_config.get("partition-id", 0)
    return config.client.store.replace("{partition-id}", str(partition))
