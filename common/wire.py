"""What crosses the wire, defined once: tensors by name, and the masked statistics.

Both directions carry the trainable tensors (adapter + head) as a list of float32
arrays in one fixed order, the :class:`TensorSpec` list, which both sides derive
from the same model config. Every array that arrives is checked against the spec:
count, shape, dtype and finiteness, and an error names the tensor and where it came
from. Clients send only updates (new - global) and a vector of whitelisted aggregate
statistics, appended as one more array so that SecAgg+ masks it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


class WireError(ValueError):
    """An array or statistic that arrived does not match what the protocol expects."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def spec_of(state: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The wire spec of a named state (order = insertion order)."""
    return [TensorSpec(name, tuple(t.shape), "float32") for name, t in state.items()]


def to_ndarrays(state: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Tensors in spec order as float32 numpy arrays."""
    return [state[s.name].detach().to(torch.float32).cpu().numpy().copy() for s in spec]


def check_array(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    """Raise :class:`WireError` naming the tensor if shape, dtype or values are wrong."""
    if not isinstance(array, np.ndarray):
        raise WireError(f"{where}: tensor {spec.name!r} is a {type(array).__name__}, not an array")
    if tuple(array.shape) != spec.shape:
        raise WireError(
            f"{where}: tensor {spec.name!r} has shape {tuple(array.shape)}, expected {spec.shape}"
        )
    if array.dtype != np.dtype(spec.dtype):
        raise WireError(
            f"{where}: tensor {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}"
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise WireError(f"{where}: tensor {spec.name!r} holds {bad} NaN/Inf value(s)")


def from_ndarrays(
    arrays: Sequence[np.ndarray], spec: Sequence[TensorSpec], where: str
) -> dict[str, torch.Tensor]:
    """Checked arrays (in spec order) back to named float32 tensors."""
    names = [s.name for s in spec]
    if len(set(names)) != len(names):  # a programming error, not bad input
        raise ValueError(
            f"tensor names repeat in the spec: {sorted(n for n in set(names) if names.count(n) > 1)[:3]}"
        )
    if len(arrays) != len(spec):
        raise WireError(f"{where}: {len(arrays)} tensors arrived, expected {len(spec)}")
    for array, s in zip(arrays, spec, strict=True):
        check_array(array, s, where)
    return {
        s.name: torch.from_numpy(np.array(a, copy=True)) for a, s in zip(arrays, spec, strict=True)
    }


def from_named_arrays(
    arrays: Mapping[str, np.ndarray], spec: Sequence[TensorSpec], where: str
) -> dict[str, torch.Tensor]:
    """Like :func:`from_ndarrays` for named arrays: missing or unexpected names are refused."""
    expected = [s.name for s in spec]
    missing = [n for n in expected if n not in arrays]
    unexpected = [n for n in arrays if n not in set(expected)]
    if missing or unexpected:
        raise WireError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    return from_ndarrays([arrays[n] for n in expected], spec, where)


@dataclass(frozen=True)
class StatsLayout:
    """Named scalar statistics packed into one masked array.

    Each value is divided by its bound so that it lies in [-1, 1]. SecAgg+ returns
    the mean over the surviving clients; times their number, the server reads sums,
    never a single client's value.
    """

    fields: tuple[tuple[str, float], ...]  # (name, bound)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec("stats", (len(self.fields),), "float32")

    def encode(self, values: Mapping[str, float]) -> np.ndarray:
        if set(values) != set(self.names):
            raise WireError(
                f"statistics {sorted(values)} do not match the layout {sorted(self.names)}"
            )
        out = np.zeros(len(self.fields), dtype=np.float32)
        for i, (name, bound) in enumerate(self.fields):
            value = float(values[name])
            if not np.isfinite(value) or abs(value) > bound:
                raise WireError(f"statistic {name!r} = {value} is outside +-{bound}")
            out[i] = value / bound
        return out

    def decode_sum(self, array: np.ndarray) -> dict[str, float]:
        """Decode a summed stats array back into per-field sums."""
        return {name: float(array[i]) * bound for i, (name, bound) in enumerate(self.fields)}


MAX_COUNT = 100_000.0
"""Counts (comparisons, pairs evaluated) a client reports per round are capped here:
the stats array is quantized, and larger bounds cost precision."""

REWARD_STATS = StatsLayout(
    (
        ("train_examples", MAX_COUNT),
        ("train_steps", MAX_COUNT),
        ("train_loss", 100.0),
        ("epsilon", 1000.0),
        ("eval_pairs", MAX_COUNT),
        ("eval_correct", MAX_COUNT),
        ("eval_loss_sum", 100.0 * MAX_COUNT),
    )
)
"""Whitelisted statistics a client returns from a reward round (inside the mask).
``eval_*`` describe the incoming global model on the client's held-out comparisons."""


POLICY_STATS = StatsLayout(
    (
        ("samples", MAX_COUNT),
        ("iterations", MAX_COUNT),
        ("score", 100.0),
        ("kl", 200.0),
        ("kl_after", 200.0),
        ("ended", 1.0),
        ("entropy", 100.0),
        ("policy_loss", 100.0),
        ("value_loss", 1000.0),
        ("clip_fraction", 1.0),
        ("approx_kl", 100.0),
        ("epsilon", 1000.0),
    )
)
"""Whitelisted statistics a client returns from a policy round (inside the mask).
``samples`` counts what the round trained on (PPO rollouts, DPO comparisons);
``score``, ``kl`` and ``ended`` describe the incoming policy's rollouts (KL to the
reference, summed over a response's tokens); ``kl_after`` the locally updated policy's."""


def pack_update(
    update: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec], stats: np.ndarray, clip: float
) -> list[np.ndarray]:
    """Update arrays + stats array, refusing values SecAgg+ would silently clip."""
    arrays = to_ndarrays(update, spec) + [stats.astype(np.float32)]
    for array, name in zip(arrays, [s.name for s in spec] + ["stats"], strict=True):
        peak = float(np.abs(array).max()) if array.size else 0.0
        if not np.isfinite(peak) or peak > clip:
            raise WireError(
                f"outgoing tensor {name!r} has |value| {peak:.4g} > secagg clipping range {clip}"
            )
    return arrays


def unpack_update(
    arrays: Sequence[np.ndarray], spec: Sequence[TensorSpec], layout: StatsLayout, where: str
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Split an (aggregated) reply into named update tensors and the stats array."""
    full = [*spec, layout.spec]
    tensors = from_ndarrays(arrays, full, where)
    stats = tensors.pop("stats").numpy()
    return tensors, stats


def nbytes(spec: Sequence[TensorSpec], itemsize: int = 4) -> int:
    return sum(s.numel for s in spec) * itemsize
