"""The run's two figures: gate distribution as delta grows (the paper's Fig. 3) and kept channels."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nasdsl.graph.ir import Network  # noqa: E402


def plot_gate_distribution(histograms: list[dict], path: Path) -> None:
    """Stacked shares of sigmoid(delta * s) in ten bins, one bar per snapshot of delta."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{h['delta']:.3g}" for h in histograms]
    bottoms = [0.0] * len(histograms)
    cmap = plt.get_cmap("coolwarm")
    for b in range(10):
        shares = [100 * h["counts"][b] / max(sum(h["counts"]), 1) for h in histograms]
        ax.bar(range(len(histograms)), shares, bottom=bottoms, color=cmap(b / 9),
               label=f"[{b / 10:.1f}, {(b + 1) / 10:.1f}{']' if b == 9 else ')'}")
        bottoms = [x + y for x, y in zip(bottoms, shares)]
    ax.set_xticks(range(len(histograms)), labels, rotation=45)
    ax.set_xlabel("delta")
    ax.set_ylabel("gates (%)")
    ax.set_title("Architecture binarisation: sigmoid(delta * s) as delta grows")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", title="gate value")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kept_channels(network: Network, masks: dict, path: Path) -> None:
    """Per layer: gated channels in the supernet and those kept."""
    names, total, kept = [], [], []
    for layer in network.layers:
        keys = [op.attrs["key"] for b in layer.blocks for op in b.ops if op.is_gate]
        if not keys:
            continue
        names.append(layer.name)
        total.append(sum(int(masks[k].numel()) for k in keys))
        kept.append(sum(int(masks[k].sum()) for k in keys))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4.5))
    x = range(len(names))
    ax.bar(x, total, color="#cccccc", label="gated channels")
    ax.bar(x, kept, color="#3b6ea8", label="kept")
    ax.set_xticks(list(x), names, rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"Kept channels per layer: {sum(kept):,} of {sum(total):,}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
