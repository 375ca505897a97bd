"""What an operator reads: our own lines once each, not the libraries' chatter.

Flower's ServerApp talks to the SuperLink over HTTP (``httpx``), which logs every
request at INFO; a ``logging.basicConfig`` on the root logger lets those through and
also prints each of Flower's own lines a second time (Flower's logger has its own
handler and propagates to the root). So we never configure the root logger: our
packages get one handler, the HTTP clients are held at WARNING, and Transformers'
progress bars and advice are off.
"""

from __future__ import annotations

import logging

import transformers

OUR_LOGGERS = ("server", "client", "common", "simulations", "fedrlhf")
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_operator_logging(level: int = logging.INFO) -> None:
    """Route our loggers to one stream handler at ``level``; idempotent."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.set_name("fedrlhf")
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(h.get_name() == "fedrlhf" for h in logger.handlers):
            logger.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
