"""Losses shared by the trainers. Pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r(chosen) - r(rejected))`` over the comparisons."""
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023), mean over comparisons.

    ``-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))``, with
    sequence log-probabilities of the chosen and rejected responses.
    """
    chosen = logp_chosen - ref_logp_chosen
    rejected = logp_rejected - ref_logp_rejected
    return -F.logsigmoid(beta * (chosen - rejected)).mean()
