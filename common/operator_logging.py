"""What an operator reads: our own lines once each, not the libraries' chatter.

Flower's ServerApp talks to the SuperLink over HTTP (``httpx``), which logs every
request at INFO; a ``logging.basicConfig`` on the root logger lets those through and
also prints each of Flower's own lines a second time (Flower's logger has its own
handler and propagates to the root). So we never configure the root logger: our
packages get one handler, the HTTP clients are held at WARNING, and Transformers'
progress bars and advice are off, as are the library warnings we have read and
answered (each filter below says why it is safe to drop).
"""

from __future__ import annotations

import logging
import os
import warnings

import transformers

OUR_LOGGERS = ("server", "client", "common", "simulations", "fedrlhf")
SERVER_LOGGERS = tuple(n for n in OUR_LOGGERS if n != "client")
"""What the ServerApp sets up: not ``client``, whose level the ClientApp decides (both
share one process in the simulation)."""
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CLIENT_LOG_LEVEL_ENV = "FEDRLHF_CLIENT_LOG_LEVEL"
"""The ClientApp's level (default INFO: a partner's SuperNode log shows its rounds). The
simulation sets WARNING: there the ServerApp's one line per round says it all."""

ANSWERED_WARNINGS = (
    # Transformers' PEFT integration asks a deprecated property; nothing to do on our side.
    (FutureWarning, r".*is_gradient_checkpointing.*"),
    # Opacus's default RNG: its noise is not cryptographically secure. Stated in the
    # README's privacy model; ``secure_mode`` costs a large factor on CPUs.
    (UserWarning, r"Secure RNG turned off.*"),
    # Ray's note on accelerator variables (we never ask Ray for GPUs).
    (FutureWarning, r"Tip: In future versions of Ray.*"),
)


def configure_operator_logging(
    level: int | str = logging.INFO, loggers: tuple[str, ...] = OUR_LOGGERS
) -> None:
    """Route ``loggers`` (ours) to one stream handler at ``level``; idempotent."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.set_name("fedrlhf")
    for name in loggers:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(h.get_name() == "fedrlhf" for h in logger.handlers):
            logger.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, message in ANSWERED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def configure_client_logging() -> None:
    """The ClientApp's logging: ``client`` at ``$FEDRLHF_CLIENT_LOG_LEVEL``, Flower's at
    INFO (its SecAgg+ stages log every step at DEBUG). The other loggers are left as they
    are where already set up: in the simulation the ServerApp shares this process, and its
    round lines must stay at INFO."""
    configure_operator_logging(os.environ.get(CLIENT_LOG_LEVEL_ENV, "INFO").upper(), ("client",))
    unset = tuple(n for n in OUR_LOGGERS if not logging.getLogger(n).handlers)
    configure_operator_logging(logging.INFO, unset)
    logging.getLogger("flwr").setLevel(logging.INFO)
