import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats

from common.dp_randomness import (
    DPOptimizerWithRandomness,
    SecureRandomness,
    SeededRandomness,
    dp_randomness,
)
from common.hardware import noise_generator


def test_secure_noise_is_gaussian_with_the_asked_std():
    source = SecureRandomness()
    noise = source.gaussian(2.5, torch.zeros(200_000))
    assert noise.dtype == torch.float32
    assert abs(float(noise.mean())) < 0.03
    assert float(noise.std()) == pytest.approx(2.5, rel=0.01)
    # Kolmogorov-Smirnov against N(0, 2.5^2): a biased or truncated sampler fails this.
    assert stats.kstest(noise.numpy() / 2.5, "norm").pvalue > 1e-4


def test_secure_uniforms_are_open_interval_and_poisson_rate_holds():
    source = SecureRandomness()
    u = source.uniform(100_000)
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    mask = source.poisson_mask(100_000, 0.05)
    assert mask.dtype == torch.bool
    assert float(mask.float().mean()) == pytest.approx(0.05, abs=0.003)


def test_secure_sources_share_no_state_and_seeded_ones_repeat():
    reference = torch.zeros(64)
    assert not torch.equal(
        SecureRandomness().gaussian(1.0, reference), SecureRandomness().gaussian(1.0, reference)
    )
    a, b = SeededRandomness(torch.device("cpu"), 7), SeededRandomness(torch.device("cpu"), 7)
    assert torch.equal(a.gaussian(1.0, reference), b.gaussian(1.0, reference))
    assert torch.equal(a.poisson_mask(50, 0.3), b.poisson_mask(50, 0.3))
    assert dp_randomness(True, torch.device("cpu"), 0).name == "secure"
    assert dp_randomness(False, torch.device("cpu"), 0).name == "seeded"


def _one_dp_step(make_optimizer) -> torch.Tensor:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    model = GradSampleModule(layer, loss_reduction="mean")
    optimizer = make_optimizer(torch.optim.SGD(layer.parameters(), lr=1.0))
    x = torch.randn(5, 4)
    optimizer.zero_grad()
    model(x).pow(2).sum(dim=1).mean().backward()
    optimizer.step()
    model._close()
    return torch.cat([p.detach().flatten() for p in layer.parameters()])


def test_seeded_source_adds_exactly_opacus_noise_and_secure_noise_differs():
    settings = {"noise_multiplier": 1.3, "max_grad_norm": 0.5, "expected_batch_size": 5}
    opacus = _one_dp_step(
        lambda o: DPOptimizer(o, generator=noise_generator(torch.device("cpu"), 4), **settings)
    )
    ours = _one_dp_step(
        lambda o: DPOptimizerWithRandomness(
            o, randomness=SeededRandomness(torch.device("cpu"), 3), **settings
        )
    )
    assert torch.equal(opacus, ours)
    secure = [
        _one_dp_step(
            lambda o: DPOptimizerWithRandomness(o, randomness=SecureRandomness(), **settings)
        )
        for _ in range(2)
    ]
    assert not torch.equal(secure[0], secure[1]) and not torch.equal(secure[0], opacus)
    assert np.isfinite(secure[0].numpy()).all()
