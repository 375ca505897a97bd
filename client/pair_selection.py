"""Which pairs annotators see first: the ones the reward model is least sure about.

A label on a pair the model already ranks confidently teaches it little; a label on a
pair it scores nearly equal (small margin) moves it most. A share of the queue is
drawn uniformly at random and kept so: those pairs are an unbiased sample for
evaluating the model on the store's own distribution, and they keep the queue from
dwelling on one corner of it. A share is asked of two annotators, to measure
agreement. The simulation's labeling study uses this same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNCERTAIN = "uncertain"
RANDOM = "random"


@dataclass(frozen=True)
class QueuedPair:
    index: int
    """Position of the pair in the candidates given to :func:`order_pairs`."""
    selection: str
    """``uncertain`` (chosen by margin) or ``random`` (uniform, for evaluation)."""
    labels_wanted: int
    """1, or 2 for a double-labeled pair."""


def order_pairs(
    margins: np.ndarray,
    random_fraction: float,
    double_fraction: float,
    rng: np.random.Generator,
) -> list[QueuedPair]:
    """Queue order for candidate pairs whose reward margins are ``margins``.

    Uncertain pairs come by increasing |margin|; random ones are spread evenly among
    them, so any prefix of the queue holds about ``random_fraction`` random pairs.
    """
    if not 0 <= random_fraction <= 1 or not 0 <= double_fraction <= 1:
        raise ValueError("random_fraction and double_fraction must be in [0, 1]")
    n = len(margins)
    shuffled = rng.permutation(n)
    n_random = int(round(random_fraction * n))
    random_part = [int(i) for i in shuffled[:n_random]]
    rest = shuffled[n_random:]
    uncertain_part = [int(i) for i in rest[np.argsort(np.abs(margins[rest]), kind="stable")]]
    queue: list[QueuedPair] = []
    taken_random = 0
    while random_part[taken_random:] or uncertain_part:
        want_random = taken_random < random_fraction * (len(queue) + 1)
        if random_part[taken_random:] and (want_random or not uncertain_part):
            queue.append(QueuedPair(random_part[taken_random], RANDOM, 1))
            taken_random += 1
        else:
            queue.append(QueuedPair(uncertain_part.pop(0), UNCERTAIN, 1))
    return _mark_double(queue, double_fraction, rng)


def order_pairs_without_model(
    count: int, double_fraction: float, rng: np.random.Generator
) -> list[QueuedPair]:
    """Queue order when there is no reward model yet: all pairs uniformly at random."""
    queue = [QueuedPair(int(i), RANDOM, 1) for i in rng.permutation(count)]
    return _mark_double(queue, double_fraction, rng)


def _mark_double(
    queue: list[QueuedPair], double_fraction: float, rng: np.random.Generator
) -> list[QueuedPair]:
    n_double = int(round(double_fraction * len(queue)))
    double = set(rng.choice(len(queue), size=n_double, replace=False).tolist()) if queue else set()
    return [QueuedPair(q.index, q.selection, 2 if k in double else 1) for k, q in enumerate(queue)]
