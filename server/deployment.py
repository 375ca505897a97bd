"""The coordinator's side of a real deployment: SuperLink, node admission, runs.

Thin wrappers that build the exact ``flower-superlink`` and ``flwr`` command lines an
operator would type, with TLS and SuperNode authentication always on, runtime
dependency installation and telemetry off, and every address explicit. The ``fedrlhf``
commands (``superlink``, ``register-node``, ``launch``) run them.
"""

from __future__ import annotations

from pathlib import Path

from common.pki import SuperLinkCertificates
from common.processes import APP_DIR, flower_bin

CONNECTION = "federation"
"""Name of the SuperLink connection written into the operator's ``FLWR_HOME``."""


def superlink_argv(certs_dir: Path, state_dir: Path, host: str, port: int) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a durable state database.

    Flower serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI) and the
    ServerApp's runtime API on this one ``host:port``.
    """
    certs = SuperLinkCertificates.in_dir(certs_dir)
    for path in (certs.ca_cert, certs.server_cert, certs.server_key):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `fedrlhf create-ca` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs.ca_cert.resolve()),
        "--ssl-certfile",
        str(certs.server_cert.resolve()),
        "--ssl-keyfile",
        str(certs.server_key.resolve()),
        "--enable-supernode-auth",
        "--isolation",
        "subprocess",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str((state_dir / "superlink.db").resolve()),
        "--disable-runtime-dependency-installation",
    ]


def write_connection(home: Path, address: str, ca_cert: Path) -> None:
    """Point the ``flwr`` CLI under ``home`` (its ``FLWR_HOME``) at the SuperLink."""
    if not ca_cert.exists():
        raise FileNotFoundError(f"{ca_cert} is missing: the federation's CA certificate")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert.resolve()}"\n'
    )


def register_node_argv(public_key: Path, name: str) -> list[str]:
    """``flwr supernode register``: admit the holder of this key to the federation."""
    if not public_key.exists():
        raise FileNotFoundError(f"{public_key} is missing: the partner's node public key")
    return [
        flower_bin("flwr"),
        "supernode",
        "register",
        str(public_key),
        CONNECTION,
        "--name",
        name,
        "--format",
        "json",
    ]


def launch_argv(run_config_file: Path | None, stream: bool, app_dir: Path = APP_DIR) -> list[str]:
    """``flwr run``: submit the fedrlhf app (this checkout) to the federation."""
    argv = [flower_bin("flwr"), "run", str(app_dir), CONNECTION]
    if run_config_file is not None:
        argv += ["--run-config", str(run_config_file)]
    if stream:
        argv.append("--stream")
    return argv
