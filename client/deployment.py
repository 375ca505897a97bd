"""A partner's side of a real deployment: the SuperNode that serves its store.

Builds the ``flower-superlink`` counterpart's command line: TLS against the
federation's CA, authenticated with the partner's node key, the store path passed
to the ClientApp as node config, the local runtime API bound where the partner says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from common.processes import flower_bin


def supernode_argv(
    superlink: str,
    ca_cert: Path,
    private_key: Path,
    store: Path,
    host: str,
    port: int,
    hardware: Mapping[str, str] | None = None,
) -> list[str]:
    """``flower-supernode`` for one organization's store; ``hardware`` (``device``,
    ``dtype``) goes into the node config, where it overrides the run config's
    ``model.device``/``model.dtype`` on this node only."""
    for path, what in ((ca_cert, "the federation's CA certificate"), (private_key, "node key")):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {what}")
    if not store.exists():
        raise FileNotFoundError(f"{store} is missing: the organization's preference store")
    return [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert.resolve()),
        "--auth-supernode-private-key",
        str(private_key.resolve()),
        "--node-config",
        " ".join(
            [f"store={json.dumps(str(store.resolve()))}"]
            + [f"{key}={json.dumps(value)}" for key, value in (hardware or {}).items()]
        ),
        "--isolation",
        "subprocess",
        "--host",
        host,
        "--port",
        str(port),
    ]
