"""``fedrlhf`` commands for a real deployment (see the README's walkthrough).

Coordinator: ``create-ca``, ``superlink``, ``register-node``, ``launch``.
Partner: ``create-node-key``, ``supernode``.

``superlink`` and ``supernode`` replace this process with Flower's (same PID), so a
service manager or a test stops them by that PID.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from client.deployment import supernode_argv
from common.config import NODE_MODEL_KEYS, RunConfig
from common.pki import certificate_hosts, create_node_key, create_superlink_certificates
from common.processes import flower_env, write_run_config
from server.deployment import launch_argv, register_node_argv, superlink_argv, write_connection

DEFAULT_HOME = Path.home() / ".fedrlhf"


def _exec(argv: list[str], home: Path) -> int:
    print(" ".join(argv), file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, flower_env(home))
    return 0  # not reached


def _create_ca(args: argparse.Namespace) -> int:
    files = create_superlink_certificates(args.dir, args.host)
    print(f"CA certificate (give to every partner): {files.ca_cert}")
    print(f"SuperLink certificate for {', '.join(certificate_hosts(files.server_cert))}")
    print(f"keep private: {files.server_key} and {Path(args.dir) / 'ca.key'}")
    return 0


def _create_node_key(args: argparse.Namespace) -> int:
    public = create_node_key(args.out, comment=args.name or "")
    print(f"private key (keep on this machine): {args.out}")
    print(f"public key (send to the coordinator): {public}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    argv = superlink_argv(Path(args.certs), Path(args.state), args.host, args.port)
    return _exec(argv, Path(args.state) / "flwr-home")


def _register_node(args: argparse.Namespace) -> int:
    home = Path(args.home)
    write_connection(home, args.superlink, Path(args.ca))
    argv = register_node_argv(Path(args.key), args.name)
    return subprocess.run(argv, env=flower_env(home), check=False).returncode


def _supernode(args: argparse.Namespace) -> int:
    hardware = {key: getattr(args, key) for key in NODE_MODEL_KEYS if getattr(args, key)}
    if hardware:  # checked here, not when the first round arrives
        RunConfig().replace(**{f"model.{key}": value for key, value in hardware.items()})
    argv = supernode_argv(
        args.superlink, Path(args.ca), Path(args.key), Path(args.store), args.host, args.port,
        hardware,
    )  # fmt: skip
    return _exec(argv, Path(args.home))


def _launch(args: argparse.Namespace) -> int:
    home = Path(args.home)
    write_connection(home, args.superlink, Path(args.ca))
    overrides = dict(args.set or [])
    RunConfig().replace(**overrides)  # refuse unknown keys before submitting
    config_file = None
    if overrides:
        config_file = write_run_config(home / "launch-run-config.toml", overrides)
    argv = launch_argv(config_file, stream=not args.detach)
    return subprocess.run(argv, env=flower_env(home), check=False).returncode


def add_deployment_commands(sub: argparse._SubParsersAction, parse_override: type | object) -> None:
    """Register the deployment subcommands on the ``fedrlhf`` parser."""
    ca = sub.add_parser("create-ca", help="coordinator: the federation's CA + SuperLink cert")
    ca.add_argument("--dir", required=True, help="where to write ca.crt, superlink.crt/.key")
    ca.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP address partners use to reach the SuperLink (repeatable)",
    )
    ca.set_defaults(func=_create_ca)

    key = sub.add_parser("create-node-key", help="partner: this organization's node key pair")
    key.add_argument("--out", required=True, help="private key path; the public key gets .pub")
    key.add_argument("--name", help="comment stored in the public key (organization name)")
    key.set_defaults(func=_create_node_key)

    link = sub.add_parser("superlink", help="coordinator: run the SuperLink (TLS + node auth)")
    link.add_argument("--certs", required=True, help="directory written by create-ca")
    link.add_argument("--state", required=True, help="directory for the SuperLink's database")
    link.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    link.add_argument("--port", type=int, default=9092)
    link.set_defaults(func=_superlink)

    for name, helptext in (
        ("register-node", "coordinator: admit a partner's node public key"),
        ("launch", "coordinator: start a run on the federation (flwr run)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
        p.add_argument("--ca", required=True, help="the federation's ca.crt")
        p.add_argument(
            "--home", default=str(DEFAULT_HOME / "operator"), help="the flwr CLI's FLWR_HOME"
        )
        if name == "register-node":
            p.add_argument("--key", required=True, help="the partner's .pub file")
            p.add_argument("--name", required=True, help="the partner's name")
            p.set_defaults(func=_register_node)
        else:
            p.add_argument(
                "--set",
                action="append",
                type=parse_override,
                metavar="KEY=VALUE",
                help="run-config override, e.g. --set run-dir=/srv/fedrlhf/run1 (repeatable)",
            )
            p.add_argument("--detach", action="store_true", help="submit and return at once")
            p.set_defaults(func=_launch)

    node = sub.add_parser("supernode", help="partner: serve this organization's store")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--ca", required=True, help="the federation's ca.crt")
    node.add_argument("--key", required=True, help="this organization's private node key")
    node.add_argument("--store", required=True, help="the organization's preference store")
    node.add_argument("--host", default="127.0.0.1", help="local runtime API address")
    node.add_argument("--port", type=int, default=9094, help="local runtime API port")
    node.add_argument(
        "--home", default=str(DEFAULT_HOME / "supernode"), help="the SuperNode's FLWR_HOME"
    )
    node.add_argument("--device", help="this node's model.device (e.g. cuda:0, cpu)")
    node.add_argument("--dtype", help="this node's model.dtype (e.g. bfloat16)")
    node.set_defaults(func=_supernode)
