"""Plots of activation statistics (matplotlib, an optional extra: pip install 'pipower[plot]')."""
from __future__ import annotations

import numpy as np

from ..errors import PipowerError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a PipowerError naming the extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")          # files only; never open a window from a library
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PipowerError("plots need matplotlib: pip install 'pipower[plot]'") from e
    return plt


def coverage_fraction(freq: np.ndarray, share: float = 0.8) -> float:
    """Smallest fraction of neurons (most frequent first) that accounts for `share` of all activations."""
    f = np.sort(freq)[::-1]
    total = f.sum()
    if total == 0:
        return 0.0
    return float((np.searchsorted(np.cumsum(f), share * total) + 1) / f.size)


def plot_frequencies(stats, path, title: str | None = None) -> None:
    """Sorted per-layer activation-frequency curves (log-log: a power law is a straight line), with the
    fraction of neurons that covers 80% of activations per layer in the legend."""
    plt = pyplot()
    freqs = stats.freqs
    L = freqs.shape[0]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i in range(L):
        f = np.sort(freqs[i])[::-1]
        ax.loglog(np.arange(1, f.size + 1), np.maximum(f, 1e-6), color=cmap(i / max(L - 1, 1)), lw=1,
                  label=f"layer {i}" if i in (0, L // 2, L - 1) else None)
    ax.set_xlabel("neuron rank (most active first)")
    ax.set_ylabel("activation frequency")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    cover = [coverage_fraction(freqs[i]) for i in range(L)]
    ax2.bar(range(L), cover, color="tab:blue")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("fraction of neurons covering 80% of activations")
    ax2.set_ylim(0, 1)
    fig.suptitle(title or f"{stats.meta.get('model_source', 'model')}: {stats.n_tokens} tokens, "
                          f"mean activity {freqs.mean():.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
