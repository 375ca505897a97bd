"""How the coordinator turns the federation's mean update into the next global model.

The mean client update (new - global, averaged by SecAgg+) is a pseudo-gradient
step. FedAvg applies it, scaled; FedAdam (Reddi et al., 2021, "Adaptive Federated
Optimization") keeps Adam moments of it on the server. Flower's own FedAdam works on
whole legacy ``Parameters`` inside a strategy, which the masked payload (update +
statistics) does not fit, so the few lines live here, with state we can checkpoint.
"""

from __future__ import annotations

import torch

from common.config import ServerConfig


class ServerOptimizer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, weights: dict[str, torch.Tensor], update: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global weights; ``update`` is the mean client update."""
        c = self.config
        if c.optimizer == "fedavg":
            return {name: weights[name] + c.learning_rate * update[name] for name in weights}
        new = {}
        for name, w in weights.items():
            u = update[name]
            m = self.m.get(name, torch.zeros_like(u))
            v = self.v.get(name, torch.zeros_like(u))
            self.m[name] = c.beta1 * m + (1 - c.beta1) * u
            self.v[name] = c.beta2 * v + (1 - c.beta2) * u * u
            new[name] = w + c.learning_rate * self.m[name] / (self.v[name].sqrt() + c.tau)
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"m.{k}": t for k, t in self.m.items()},
            **{f"v.{k}": t for k, t in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m = {k[2:]: t for k, t in state.items() if k.startswith("m.")}
        self.v = {k[2:]: t for k, t in state.items() if k.startswith("v.")}
