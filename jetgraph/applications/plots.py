"""matplotlib pictures for the applications (PNG, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jetgraph.applications.lens import LensResult


def _token_text(tokenizer, index: int, width: int = 7) -> str:
    text = tokenizer.decode([int(index)]) if tokenizer is not None else str(int(index))
    text = text.replace("\n", "\\n").strip() or repr(text)[1:-1] or "␣"
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_lens(results: Sequence[LensResult], path: str | Path, tokenizer=None,
              input_ids=None, batch_index: int = 0) -> Path:
    """One grid per order (centres × positions: top-1 token, coloured by its probability) and the
    cosine to the true logits by layer, one curve per order."""
    path = Path(path)
    if not results:
        raise ValueError("plot_lens needs at least one LensResult")
    count = len(results)
    rows, positions = len(results[0].labels), results[0].logits.shape[2]
    fig, axes = plt.subplots(1, count + 1, figsize=(4 + 0.75 * positions * count + 5, 1.5 + 0.28 * rows),
                             gridspec_kw={"width_ratios": [positions] * count + [max(4, positions // 2)]})
    for ax, result in zip(axes[:-1], results, strict=True):
        index, prob = result.top1()
        index, prob = index[:, batch_index], prob[:, batch_index]
        image = ax.imshow(prob.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for r in range(rows):
            for c in range(positions):
                ax.text(c, r, _token_text(tokenizer, index[r, c]), ha="center", va="center", fontsize=6,
                        color="white" if prob[r, c] < 0.6 else "black")
        ax.set_yticks(range(rows), result.labels if ax is axes[0] else [""] * rows, fontsize=6)
        if input_ids is not None:
            ax.set_xticks(range(positions), [_token_text(tokenizer, t, 9) for t in input_ids[batch_index]],
                          rotation=60, fontsize=6)
        else:
            ax.set_xticks(range(positions))
        ax.set_title(f"{result.kind} lens, order {result.order}: top-1 token (colour: probability)",
                     fontsize=8)
    fig.colorbar(image, ax=axes[:-1], fraction=0.02, pad=0.01)
    curve = axes[-1]
    lowest = 0.0
    for result in results:
        cosine = result.metrics["cosine"].mean(-1).numpy()
        lowest = min(lowest, float(cosine.min()))
        curve.plot(range(len(cosine)), cosine, marker="o", markersize=3, label=f"order {result.order}")
    curve.set_xlabel("stream state h_ℓ")
    curve.yaxis.tick_right()
    curve.yaxis.set_label_position("right")
    curve.set_ylabel("cosine to the model's logits")
    curve.set_ylim(lowest - 0.05, 1.02)
    curve.grid(alpha=0.3)
    curve.legend(fontsize=7)
    curve.set_title("lens faithfulness by layer", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path,
                xlabel: str, ylabel: str, title: str) -> Path:
    """Simple line plot (e.g. hit ratio and total mass across training checkpoints)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(list(xs), list(values), marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
