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


MAX_COUNT = 100_000.0
"""Privacy units a client's statistics count per round are capped here: the stats array
is quantized, and a larger range costs precision."""


@dataclass(frozen=True)
class StatsLayout:
    """Named statistics, each a sum over privacy units, packed into one masked array.

    ``fields`` pairs each name with its unit bound: how much one unit can add to it
    (1 for a count, the clip of a clipped loss, score or KL). The vector of statistics,
    each divided by its unit bound, moves by at most sqrt(number of fields) in L2 when
    a unit is added or removed: :mod:`common.dp_statistics` noises it for that. On the wire
    each value is divided by ``MAX_COUNT`` units' worth so that it lies in [-1, 1];
    SecAgg+ returns the mean over the surviving clients, and times their number the
    server reads sums, never a single client's value.
    """

    fields: tuple[tuple[str, float], ...]  # (name, unit bound)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def unit_bounds(self) -> np.ndarray:
        return np.array([bound for _, bound in self.fields], dtype=np.float64)

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
            if not np.isfinite(value) or abs(value) > MAX_COUNT * bound:
                raise WireError(f"statistic {name!r} = {value} is outside +-{MAX_COUNT * bound:g}")
            out[i] = value / (MAX_COUNT * bound)
        return out

    def decode_sum(self, array: np.ndarray) -> dict[str, float]:
        """Decode a summed stats array back into per-field sums."""
        return {
            name: float(array[i]) * MAX_COUNT * bound for i, (name, bound) in enumerate(self.fields)
        }


EVAL_LOSS_CLIP = 4.0
"""A held-out comparison's Bradley-Terry loss is clipped here (margin -4) before it is
summed into a statistic: the clip is its sensitivity."""
SCORE_CLIP = 5.0
"""A sampled response's reward-model score is clipped to +-this in the statistics."""
KL_CLIP = 8.0
"""A sampled response's summed per-token KL to the reference is clipped to [0, this] in the
statistics. Per-response KL is heavy-tailed (measured on the default run's policies:
median 0.3 nats, 90th percentile 0.5 at a mean of 0.3, 10 at a mean of 3.3): at 8 the
clipped mean is 3% low at a mean of 0.3 nats, at 4 it was 11% low, and the noise grows
with the clip."""

REWARD_STATS = StatsLayout(
    (("eval_pairs", 1.0), ("eval_correct", 1.0), ("eval_loss_sum", EVAL_LOSS_CLIP))
)
"""What a client reports of the reward model it was sent, on its held-out comparisons (a
held-out comparison is one unit): sent, noised, with the final evaluation only."""

POLICY_STATS = StatsLayout(
    (
        ("measured", 1.0),
        ("score_sum", SCORE_CLIP),
        ("kl_sum", KL_CLIP),
        ("kl_after_sum", KL_CLIP),
        ("ended", 1.0),
    )
)
"""What a client reports of a policy round, on one Poisson sample of its prompts (a prompt
is one unit): how many were measured, the incoming policy's reward-model score, its KL to
the reference and whether its response ended (EOS), and the locally updated policy's KL on
the same prompts (``kl_after_sum``, zero in an evaluation)."""

CANDIDATE_STATS = StatsLayout((("measured", 1.0), ("score_sum", SCORE_CLIP), ("kl_sum", KL_CLIP)))
"""What a client reports of the candidate policy it was sent in a ``measure`` round (the
aggregate of the round's updates), on a Poisson sample of its prompts: how many were
measured, the reward-model score and the KL to the reference. It is the policy round's
only release with ``policy.trust-region-kl = "aggregate"``; three fields, so the noise is
sqrt(3 / 5) of what :data:`POLICY_STATS` carries."""


def pack_update(
    update: Mapping[str, torch.Tensor],
    spec: Sequence[TensorSpec],
    stats: np.ndarray | None,
    clip: float,
) -> list[np.ndarray]:
    """Update arrays (+ the stats array, if any), refusing values SecAgg+ would silently clip."""
    arrays = to_ndarrays(update, spec)
    names = [s.name for s in spec]
    if stats is not None:
        arrays.append(stats.astype(np.float32))
        names.append("stats")
    for array, name in zip(arrays, names, strict=True):
        peak = float(np.abs(array).max()) if array.size else 0.0
        if not np.isfinite(peak) or peak > clip:
            raise WireError(
                f"outgoing tensor {name!r} has |value| {peak:.4g} > secagg clipping range {clip}"
            )
    return arrays


def unpack_update(
    arrays: Sequence[np.ndarray],
    spec: Sequence[TensorSpec],
    layout: StatsLayout | None,
    where: str,
) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """Split an (aggregated) reply into named update tensors and the stats array (None
    when ``layout`` is None: the reply carries no statistics)."""
    full = [*spec, layout.spec] if layout is not None else list(spec)
    tensors = from_ndarrays(arrays, full, where)
    stats = tensors.pop("stats").numpy() if layout is not None else None
    return tensors, stats


def nbytes(spec: Sequence[TensorSpec], itemsize: int = 4) -> int:
    return sum(s.numel for s in spec) * itemsize
