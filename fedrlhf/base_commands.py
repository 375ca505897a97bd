"""``fedrlhf base``: build, export and install the built-in English base.

Every machine of a federation must hold the same base weights. Build it once (on the
coordinator: ``fedrlhf base --out english-base``), send that directory to every
partner, and install it there (``fedrlhf base --install english-base``); then
``model.base = "builtin:english"`` names the same weights everywhere, and each
machine prints the same fingerprint.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common.english_base import english_base_dir, install_english_base, weights_fingerprint


def _base(args: argparse.Namespace) -> int:
    if args.install:
        path = install_english_base(Path(args.install))
        print(f"installed {args.install} as builtin:english: {path}")
    else:
        path = english_base_dir()
        print(f"builtin:english: {path}")
        if args.out:
            out = Path(args.out)
            if out.exists():
                raise FileExistsError(f"{out} exists; give a new directory")
            shutil.copytree(path, out)
            print(f"copied to {out}: send it to every partner (fedrlhf base --install {out})")
    print(f"weights fingerprint {weights_fingerprint(path)}")
    return 0


def add_base_command(sub: argparse._SubParsersAction) -> None:
    """Register ``fedrlhf base`` on the ``fedrlhf`` parser."""
    base = sub.add_parser(
        "base", help="build (once, cached), export or install the built-in English base"
    )
    where = base.add_mutually_exclusive_group()
    where.add_argument("--out", help="also copy the built base to this new directory")
    where.add_argument("--install", metavar="DIR", help="install a base built elsewhere")
    base.set_defaults(func=_base)
