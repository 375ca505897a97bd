"""Where DP-SGD's randomness comes from: a seeded generator, or a secure one.

DP-SGD's guarantee rests on two random draws a client makes: which units its Poisson
sample takes, and the Gaussian noise added to the clipped sum. Both must be unknown to
whoever sees the update. torch's generators (Mersenne Twister on CPU, Philox on GPU)
are reproducible from a seed, which simulations and tests want, but they are not
cryptographically secure: the Opacus authors warn against them in production.

Opacus's own ``secure_mode`` needs ``torchcsprng``, which has no builds for current
torch. :class:`SecureRandomness` is the equivalent: a ChaCha20 keystream (the
``cryptography`` package) keyed from ``os.urandom``, turned into uniform doubles and
Gaussians by Box-Muller, with Opacus's floating-point defence for the noise (the sum of
four draws halved, Holohan and Braghin 2021, section 5.1, as ``secure_mode`` does).

:class:`DPOptimizerWithRandomness` is Opacus's ``DPOptimizer`` drawing its noise from
either source; with :class:`SeededRandomness` it adds exactly the noise Opacus would.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.hardware import noise_generator


class DPRandomness(Protocol):
    """The two draws of a DP-SGD step."""

    name: str
    """``seeded`` or ``secure``: reports and ledgers say which was used."""

    def poisson_mask(self, units: int, rate: float) -> torch.Tensor:
        """Which of ``units`` the step samples, each independently with ``rate``."""
        ...

    def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """Noise N(0, std^2) of ``reference``'s shape, dtype and device."""
        ...


class SeededRandomness:
    """Reproducible draws: a seeded sampling generator and one for the noise."""

    name = "seeded"

    def __init__(self, device: torch.device, seed: int) -> None:
        self.sampling = torch.Generator().manual_seed(seed)
        self.noise = noise_generator(device, seed + 1)

    def poisson_mask(self, units: int, rate: float) -> torch.Tensor:
        return torch.rand(units, generator=self.sampling) < rate

    def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        return torch.normal(
            0.0, std, size=reference.shape, device=reference.device, generator=self.noise
        ).to(reference.dtype)


class SecureRandomness:
    """Draws from a ChaCha20 keystream keyed by the operating system's entropy."""

    name = "secure"

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._keystream = cipher.encryptor()

    def uniform(self, count: int) -> np.ndarray:
        """``count`` doubles uniform on (0, 1), 53 random bits each, never 0 or 1."""
        words = np.frombuffer(self._keystream.update(bytes(8 * count)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` N(0, 1) doubles by Box-Muller (both of each pair used)."""
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = 2.0 * math.pi * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def poisson_mask(self, units: int, rate: float) -> torch.Tensor:
        return torch.from_numpy(self.uniform(units) < rate)

    def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        count = reference.numel()
        draws = self.standard_normal(4 * count).reshape(4, count).sum(axis=0) / 2.0
        noise = torch.from_numpy(std * draws).reshape(reference.shape)
        return noise.to(device=reference.device, dtype=reference.dtype)


def randomness_name(secure: bool) -> str:
    """What ledgers and reports call the source ``privacy.secure-noise`` picks."""
    return SecureRandomness.name if secure else SeededRandomness.name


def dp_randomness(secure: bool, device: torch.device, seed: int) -> DPRandomness:
    """The source a trainer draws from: secure unless the run asked for reproducibility."""
    return SecureRandomness() if secure else SeededRandomness(device, seed)


class DPOptimizerWithRandomness(DPOptimizer):
    """Opacus's DP optimizer, its Gaussian noise drawn from ``randomness``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, randomness: DPRandomness, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.randomness = randomness

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.randomness.gaussian(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)
