"""Losses shared by the trainers. Pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r(chosen) - r(rejected))`` over the comparisons."""
    return -F.logsigmoid(chosen - rejected).mean()
