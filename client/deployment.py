"""A partner's side of a real deployment: the SuperNode that serves its store.

Builds the ``flower-superlink`` counterpart's command line: TLS against the
federation's CA, authenticated with the partner's node key, the store path passed
to the ClientApp as node config, the local runtime API bound where the partner says.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.processes import flower_bin


def supernode_argv(
    superlink: str, ca_cert: Path, private_key: Path, store: Path, host: str, port: int
) -> list[str]:
    """``flower-supernode`` for one organization's store."""
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
        f"store={json.dumps(str(store.resolve()))}",
        "--isolation",
        "subprocess",
        "--host",
        host,
        "--port",
        str(port),
    ]
