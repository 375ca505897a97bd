"""How many key shares each client of a SecAgg+ round sends, and how many unmask.

SecAgg+ (Bell et al., CCS 2020) replaces SecAgg's complete graph, where every client
secret-shares its keys with every other (quadratic work and bytes), with a sparse one:
Flower puts the sampled clients on a ring in random order and each shares with itself
and the ``k - 1`` nearest on the ring. A client's keys can be rebuilt from ``t`` of
its ``k`` shares, so:

* fewer than ``t`` of a client's neighbours learn nothing of its keys: with ``t``
  more than half of ``k`` no minority of a neighbourhood can unmask it, and the server
  is never handed both kinds of a client's shares;
* the round survives any ``k - t`` dropouts (no neighbourhood can lose more), and
  independent dropouts at rate ``d`` with probability at least ``1 - failure`` when
  ``n * P[Binomial(k, d) > k - t] <= failure`` (a union bound over the ``n``
  neighbourhoods).

:func:`share_graph` picks the smallest odd ``k`` that meets the second condition; it
grows like ``log n`` (for d = 0.1 and failure 1e-3: 15 at 20 clients, 17 at 30, 19 at
100, 23 at 1000) and is ``n`` (SecAgg) where no smaller ``k`` does (up to 10 clients).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from common.config import FederationConfig


@dataclass(frozen=True)
class ShareGraph:
    clients: int
    shares: int
    """k: shares per client (itself and k - 1 neighbours)."""
    threshold: int
    """t: shares that rebuild a client's keys."""
    dropout_rate: float
    failure_bound: float
    """Upper bound on the chance that independent dropouts at ``dropout_rate`` fail
    the round (some neighbourhood left with fewer than t)."""

    @property
    def tolerated_dropouts(self) -> int:
        """Dropouts the round survives whichever clients they are."""
        return self.shares - self.threshold

    def to_json(self) -> dict:
        return {**asdict(self), "tolerated_dropouts": self.tolerated_dropouts}

    def describe(self) -> str:
        graph = "complete" if self.shares >= self.clients else f"{self.shares} of {self.clients}"
        return (
            f"SecAgg+ shares {graph}, threshold {self.threshold}: survives any "
            f"{self.tolerated_dropouts} dropouts, and independent dropouts at "
            f"{self.dropout_rate:.0%} with probability >= {1 - self.failure_bound:.6f}"
        )


def threshold_for(shares: int, fraction: float) -> int:
    """More than ``fraction`` of the shares (at least 2, at most all)."""
    return min(shares, max(2, math.floor(fraction * shares) + 1))


def failure_bound(clients: int, shares: int, threshold: int, dropout_rate: float) -> float:
    """``n * P[Binomial(k, d) > k - t]``: some neighbourhood keeps fewer than t shares."""
    lost_too_many = sum(
        math.comb(shares, j) * dropout_rate**j * (1 - dropout_rate) ** (shares - j)
        for j in range(shares - threshold + 1, shares + 1)
    )
    return min(1.0, clients * lost_too_many)


def share_graph(clients: int, federation: FederationConfig) -> ShareGraph:
    """The SecAgg+ graph for a round of ``clients`` sampled clients.

    ``federation.secagg-shares``: ``auto`` (the smallest odd k whose failure bound at
    ``secagg-dropout`` is within ``secagg-failure``), ``all``, or a number k.
    """
    setting = federation.secagg_shares
    fraction, rate = federation.secagg_threshold, federation.secagg_dropout
    if setting == "all":
        shares = clients
    elif setting == "auto":
        shares = clients
        for k in range(3, clients, 2):
            t = threshold_for(k, fraction)
            if failure_bound(clients, k, t, rate) <= federation.secagg_failure:
                shares = k
                break
    else:
        shares = min(clients, int(setting))
    threshold = threshold_for(shares, fraction)
    return ShareGraph(
        clients, shares, threshold, rate, failure_bound(clients, shares, threshold, rate)
    )
