"""``--device`` and ``--dtype`` for the commands that load the base on a partner's machine."""

from __future__ import annotations

import argparse

from common.config import ModelConfig


def add_hardware_options(parser: argparse.ArgumentParser) -> None:
    defaults = ModelConfig()
    parser.add_argument(
        "--device", default=defaults.device, help="auto (CUDA, else MPS, else CPU), cpu, cuda:N"
    )
    parser.add_argument(
        "--dtype", default=defaults.dtype, help="the base's precision: auto, float32, bfloat16"
    )


def model_config_of(args: argparse.Namespace) -> ModelConfig:
    """The model settings these options give (checked like a run config)."""
    from common.config import RunConfig

    config = RunConfig().replace(**{"model.device": args.device, "model.dtype": args.dtype})
    return config.model
