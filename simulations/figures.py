"""Matplotlib for the simulation's plots: the headless backend, and one way to save."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Lay out, write as a 120-dpi PNG, and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
