"""Train the reward adapter + head on local comparisons, with DP-SGD (Opacus).

The privacy unit is one comparison. Each step scores the chosen and the rejected
texts in two forward passes whose batch dimension is the comparison, so Opacus
computes and clips one gradient per comparison (folding the pair into a batch of
2B sequences would clip per sequence and silently double the sensitivity).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant
from torch.utils.data import DataLoader, TensorDataset

from common.config import PolicyConfig, RewardConfig
from common.dp_randomness import DPOptimizerWithRandomness, DPRandomness, dp_randomness
from common.losses import bradley_terry_loss
from common.model import EncodedPairs, RewardModel
from common.privacy import DPEvent, planned_steps


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    secure: bool = True
    """Draw the Poisson sample and the noise from a CSPRNG (``privacy.secure-noise``);
    ``False`` for reproducible simulations and tests (:mod:`common.dp_randomness`)."""


@dataclass(frozen=True)
class OptimizerSettings:
    name: str
    learning_rate: float
    momentum: float = 0.0

    @classmethod
    def of(cls, config: RewardConfig | PolicyConfig) -> OptimizerSettings:
        return cls(config.optimizer, config.learning_rate, config.momentum)

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.learning_rate)
        return torch.optim.SGD(params, lr=self.learning_rate, momentum=self.momentum)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    event: DPEvent | None
    """The DP run this training added to the accountant (None without DP)."""


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns that no row in the batch uses."""
    width = int(mask.sum(dim=1).max()) if mask.shape[0] else 1
    return ids[:, :width], mask[:, :width]


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader


def _poisson_batches(
    dataset: TensorDataset, rate: float, randomness: DPRandomness
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each comparison independently with ``rate``; a batch may be empty."""
    while True:
        yield dataset[randomness.poisson_mask(len(dataset), rate).nonzero().squeeze(1)]


def _pair_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    chosen_ids, chosen_mask, rejected_ids, rejected_mask = batch
    chosen = model(*_trim(chosen_ids, chosen_mask))
    rejected = model(*_trim(rejected_ids, rejected_mask))
    return bradley_terry_loss(chosen, rejected)


def finish_training(
    model: torch.nn.Module, trained: torch.nn.Module, params: list[torch.nn.Parameter]
) -> None:
    """Back to evaluation mode, Opacus hooks and per-sample buffers removed, no grads kept."""
    model.eval()
    if isinstance(trained, GradSampleModule):
        trained._close()
    for p in params:
        p.grad = None


def noise_only_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still takes a (pure noise) step, as the accounting assumes."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def train_reward_model(
    model: RewardModel,
    pairs: EncodedPairs,
    *,
    steps: int,
    batch_size: int,
    optimizer: OptimizerSettings,
    dp: DPSettings | None,
    accountant: IAccountant | None = None,
    seed: int = 0,
) -> TrainResult:
    """Run ``steps`` optimizer steps of Bradley-Terry training on ``pairs``.

    With ``dp``, batches are Poisson-sampled at rate ``batch_size / len(pairs)``,
    per-comparison gradients are clipped to ``max_grad_norm`` and Gaussian noise is
    added (Opacus); ``accountant`` (holding the client's history) records the run.
    Without ``dp``, batches are shuffled and no privacy is claimed.
    """
    if len(pairs) == 0:
        raise ValueError("no comparisons to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    torch_optimizer = optimizer.build(params)
    dataset = TensorDataset(
        pairs.chosen_ids, pairs.chosen_mask, pairs.rejected_ids, pairs.rejected_mask
    )

    model.train()  # Opacus captures activations only in training mode
    trained: torch.nn.Module = model
    event = None
    if dp is None:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            dataset, batch_size=min(batch_size, len(pairs)), shuffle=True, generator=generator
        )
        batches = _batches(loader)
    else:
        if accountant is None:
            raise ValueError("DP training needs the client's accountant")
        # What Opacus's make_private does, with the sample and the noise drawn from
        # ``randomness`` (secure or seeded).
        rate, _ = planned_steps(len(pairs), batch_size, 1.0)
        expected = max(1, int(len(pairs) * rate))
        randomness = dp_randomness(dp.secure, model.device, seed)
        trained = GradSampleModule(model, loss_reduction="mean")
        torch_optimizer = DPOptimizerWithRandomness(
            torch_optimizer,
            randomness=randomness,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected,
        )
        torch_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
        batches = _poisson_batches(dataset, rate, randomness)
        event = DPEvent(dp.noise_multiplier, rate, steps)

    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Opacus's hooks on a frozen base warn once per step; harmless here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(steps):
                batch = next(batches)
                torch_optimizer.zero_grad(set_to_none=True)
                if batch[0].shape[0] == 0:
                    noise_only_step(torch_optimizer, params)
                    continue
                loss = _pair_loss(trained, batch)
                loss.backward()
                torch_optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        finish_training(model, trained, params)
    return TrainResult(steps=steps, mean_loss=sum(losses) / max(1, len(losses)), event=event)
