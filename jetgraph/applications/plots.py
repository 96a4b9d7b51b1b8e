"""matplotlib pictures for the applications (PNG, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation

from jetgraph.applications.lens import LensAverage, LensResult
from jetgraph.applications.statistics import bootstrap_mean
from jetgraph.files import atomic_write

HATCH = "////"
DIVERGING_LABEL = "diverging series: metrics not of the decoder"


def _state_label(result: LensResult, index: int) -> str:
    """A lens row's tick: the state's name and the unit that wrote it (``h3 · block2``)."""
    if result.kind == "joint":
        return "joint lens"
    after = result.written_by[index] if result.written_by else ""
    return f"{result.labels[index]} · {after}" if after else result.labels[index]


def _token_text(tokenizer, index: int, width: int = 7) -> str:
    text = tokenizer.decode([int(index)]) if tokenizer is not None else str(int(index))
    text = text.replace("\n", "\\n").strip() or repr(text)[1:-1] or "␣"
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_lens(results: Sequence[LensResult], path: str | Path, tokenizer=None,
              input_ids=None, batch_index: int = 0) -> Path:
    """Draw lens results, iterative and joint in any mix.

    Every iterative result gets a grid (centres × positions: top-1 token, coloured by its
    probability) and a cosine-by-layer curve (mean over positions). A joint result is drawn as a
    horizontal line "joint lens, order k" at its mean cosine in the cosine panel, and as an extra
    grid row under the iterative grid of the same order (its own grid when no iterative result
    was given). Diverged cells (non-finite lens logits, see :attr:`LensResult.diverged`) are
    gray and marked "∞"; NaN cosines leave gaps in the curves (a diverged joint lens is named in
    the legend, without a line). Cells whose jet is a finite but diverging series
    (:attr:`LensResult.divergent`) are hatched, and states where it diverges at some position
    carry a × on their cosine curve, with one legend line saying so.
    """
    path = Path(path)
    if not results:
        raise ValueError("plot_lens needs at least one LensResult")
    iterative = [r for r in results if r.kind != "joint"]
    joint = [r for r in results if r.kind == "joint"]
    grids: list[tuple[LensResult | None, list[LensResult]]] = [
        (r, [j for j in joint if j.order == r.order]) for r in iterative]
    if not grids:
        grids = [(None, [j]) for j in joint]
    count = len(grids)
    positions = results[0].logits.shape[2]
    rows = max((len(r.labels) if r is not None else 0) + len(extra) for r, extra in grids)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    fig, axes = plt.subplots(1, count + 1, figsize=(4 + 0.75 * positions * count + 5, 1.8 + 0.28 * rows),
                             gridspec_kw={"width_ratios": [positions] * count + [max(4, positions // 2)]})
    image = None
    for ax, (result, extra) in zip(axes[:-1], grids, strict=True):
        shown = ([result] if result is not None else []) + extra
        index = torch.cat([r.top1()[0][:, batch_index] for r in shown])
        prob = torch.cat([r.top1()[1][:, batch_index] for r in shown]).float()
        diverged = torch.cat([~torch.isfinite(r.logits[:, batch_index]).all(-1) for r in shown])
        series = torch.cat([r.divergent_tokens[:, batch_index] for r in shown]) & ~diverged
        prob = prob.masked_fill(diverged, float("nan"))
        labels = [_state_label(r, i) for r in shown for i in range(len(r.labels))]
        image = ax.imshow(prob.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for r in range(len(labels)):
            for c in range(positions):
                text = "∞" if diverged[r, c] else _token_text(tokenizer, index[r, c])
                ax.text(c, r, text, ha="center", va="center", fontsize=6,
                        color="black" if diverged[r, c] or prob[r, c] >= 0.6 else "white")
                if series[r, c]:
                    ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch=HATCH,
                                           edgecolor="0.35", linewidth=0))
        if result is not None and extra:
            ax.axhline(len(result.labels) - 0.5, color="white", linewidth=2)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        if input_ids is not None:
            ax.set_xticks(range(positions), [_token_text(tokenizer, t, 9) for t in input_ids[batch_index]],
                          rotation=60, fontsize=6)
        else:
            ax.set_xticks(range(positions))
        head = shown[0]
        title = f"{head.kind} lens, order {head.order}: top-1 token (colour: probability)"
        states = sum(int(r.diverged.any(-1).sum()) for r in shown)
        if states:
            title += f"\n{states} of {len(labels)} states diverge (gray, ∞: non-finite logits)"
        divergent = int(series.any(-1).sum())
        if divergent:
            title += f"\n{divergent} of {len(labels)} states: diverging series (hatched)"
        ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=axes[:-1], fraction=0.02, pad=0.01)
    curve = axes[-1]
    finite: list[float] = [1.0]
    marked = False
    for result in iterative:
        cosine = result.metrics["cosine"].mean(-1).numpy()
        finite += [float(x) for x in cosine if math.isfinite(x)]
        label = f"order {result.order}"
        if not math.isfinite(float(cosine.sum())):
            label += f" ({int(result.diverged.any(-1).sum())} diverged)"
        line, = curve.plot(range(len(cosine)), cosine, marker="o", markersize=3, label=label)
        flagged = (result.divergent & ~result.diverged).any(-1).numpy()
        if flagged.any():
            states = [i for i, f in enumerate(flagged) if f]
            curve.plot(states, cosine[states], linestyle="none", marker="x", markersize=7,
                       color=line.get_color())
            marked = True
    styles = iter(["--", ":", "-."] * len(joint))
    for result in joint:
        cosine = result.metrics["cosine"].mean().item()
        label = f"joint lens, order {result.order}"
        if math.isfinite(cosine):
            finite.append(cosine)
            curve.axhline(cosine, color="black", linestyle=next(styles), linewidth=1,
                          label=f"{label}: {cosine:.3f}")
        else:
            curve.plot([], [], " ", label=f"{label}: diverged (NaN)")
    if marked:
        curve.add_patch(Rectangle((0, 0), 0, 0, fill=False, hatch=HATCH, edgecolor="0.35",
                                  label="hatched, ×: " + DIVERGING_LABEL))
    curve.set_xlabel("stream state h_ℓ")
    curve.yaxis.tick_right()
    curve.yaxis.set_label_position("right")
    curve.set_ylabel("cosine to the model's logits")
    curve.set_ylim(min(0.0, min(finite)) - 0.05, 1.02)
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.grid(alpha=0.3)
    below = curve.transAxes + ScaledTranslation(0, -0.42, fig.dpi_scale_trans)  # under the x label
    curve.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 0), bbox_transform=below)
    curve.set_title("lens faithfulness by layer", fontsize=8)
    return _save(fig, path)


def plot_lens_average(averages: Sequence[LensAverage], path: str | Path) -> Path:
    """Cosine to the logits by stream state, one curve per order: the mean over the prompts with
    its 95% bootstrap interval (shaded; prompts resampled). A state where some prompt diverged
    is a gap; one where some prompt's jet is a diverging series is marked × (legend line)."""
    path = Path(path)
    if not averages:
        raise ValueError("plot_lens_average needs at least one LensAverage")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    marked = False
    for average in averages:
        cosine = average.prompt_metrics["cosine"]  # [centres, prompts]
        stats = [bootstrap_mean(row) if torch.isfinite(row).all() else None for row in cosine]
        mean = [s["mean"] if s else math.nan for s in stats]
        low = [s["low"] if s else math.nan for s in stats]
        high = [s["high"] if s else math.nan for s in stats]
        states = range(len(mean))
        line, = ax.plot(states, mean, marker="o", markersize=3, label=f"order {average.order}")
        ax.fill_between(states, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        flagged = [i for i in states if average.divergent[i] and math.isfinite(mean[i])]
        if flagged:
            ax.plot(flagged, [mean[i] for i in flagged], linestyle="none", marker="x", markersize=7,
                    color=line.get_color())
            marked = True
    if marked:
        ax.plot([], [], linestyle="none", marker="x", color="black",
                label=f"×: {DIVERGING_LABEL} (some prompt)")
    head = averages[0]
    ticks = [f"{label} · {by}" for label, by in zip(head.labels, head.written_by, strict=True)]
    ax.set_xticks(range(len(ticks)), ticks, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("cosine to the model's logits")
    ax.set_title(f"iterative lens over {head.prompts} prompts ({head.positions:,} tokens): "
                 "mean and 95% bootstrap interval", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


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
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Save ``fig`` whole or not at all (the format from the suffix), and close it."""
    try:
        return atomic_write(path, lambda name: fig.savefig(name, format=path.suffix.lstrip(".") or "png",
                                                          dpi=130, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_roles(report, path: str | Path, tokenizer=None, shown: int = 16) -> Path:
    """Component roles: each unit's path score (left) and its ΔLogit under the interventions
    with 95% intervals (right), units in ranking order; pairs below when they were verified,
    then the ablated attention units (no path, so no score)."""
    from jetgraph.applications.roles import METHOD_NAMES, METHODS

    path = Path(path)
    ranked = report.singles[:shown] + [p for p in report.pairs[:3] if report.effect(p.units, "zero")]
    unit_sets = [s.units for s in ranked] + report.unranked()
    labels = ["+".join(u) for u in unit_sets][::-1]
    height = 1.7 + 0.3 * len(unit_sets)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    fig.subplots_adjust(top=1 - 0.45 / height, bottom=0.6 / height)  # title and labels: fixed inches
    rows = range(len(unit_sets))
    score_of = [s.score for s in ranked] + [math.nan] * (len(unit_sets) - len(ranked))
    left.barh(rows, score_of[::-1], color="tab:blue")
    left.axvline(report.reference.score, color="gray", linestyle="--", linewidth=1,
                 label=f"E→U {report.reference.score:+.2f}")
    left.set_yticks(rows, labels, fontsize=7)
    for y in range(len(unit_sets) - len(ranked)):  # reversed order: the unranked sets are at the bottom
        left.text(0, y, " no bigram path (attention)", fontsize=6, va="center", color="gray")
    left.set_xlabel("path score: centred target logit over its best 16 sources (data-free)")
    left.legend(fontsize=7)
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        effects = [report.effect(u, method) for u in unit_sets][::-1]
        ys = [r + (k - 1) * width for r in rows]
        means = [e.mean if e else math.nan for e in effects]
        errors = [[e.mean - e.low if e else 0 for e in effects],
                  [e.high - e.mean if e else 0 for e in effects]]
        right.barh(ys, means, height=width, xerr=errors, label=METHOD_NAMES[method], capsize=2)
        others = [e.others if e and e.others is not None else math.nan for e in effects]
        right.scatter(others, ys, marker="D", facecolor="white", edgecolor="black", s=14, zorder=3,
                      label="the same at other positions (every token)" if k == 0 else None)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel(f"ΔLogit of the target over {report.positions:,} positions (95% interval)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"component roles for {report.targets.describe(tokenizer, shown=4)}", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_diff(diff, path: str | Path, tokenizer=None, shown: int = 15) -> Path:
    """A model diff: the bigrams whose probability rose most (right) and fell most (left)."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.28 * shown))
    for ax, direction, colour in ((axes[0], "decrease", "tab:red"), (axes[1], "increase", "tab:green")):
        entries = diff.entries(direction, tokenizer)[:shown][::-1]
        ax.barh(range(len(entries)), [e["p_b"] - e["p_a"] for e in entries], color=colour)
        ax.set_yticks(range(len(entries)), [f"{e['context_text']!r}→{e['next_text']!r}" if tokenizer
                                            else f"{e['context']}→{e['next']}" for e in entries], fontsize=7)
        ax.set_xlabel("p_B − p_A")
        ax.set_title(f"largest {direction}s ({diff.rank})", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{diff.readout}: {diff.name_a} → {diff.name_b}", fontsize=9)
    return _save(fig, path)


def plot_masses(rows: Sequence[dict], path: str | Path) -> Path:
    """Keyword masses per model with 95% intervals: the paper's mean mass (left) and the mass
    relative to frequency-matched control tokens (right)."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(9, 1.5 + 0.35 * len(rows)), sharey=True)
    names = [r["model"] for r in rows][::-1]
    for ax, key, label in ((axes[0], "mass", "mean keyword mass over source tokens"),
                           (axes[1], "lift", "keyword mass ÷ matched control mass")):
        values = [r[key] for r in rows][::-1]
        errors = [[r[key] - r[f"{key}_low"] for r in rows][::-1],
                  [r[f"{key}_high"] - r[key] for r in rows][::-1]]
        ax.barh(range(len(rows)), values, xerr=errors, capsize=3, color="tab:purple")
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.set_xlabel(label + " (95% interval)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes[1].axvline(1.0, color="gray", linestyle="--", linewidth=1)
    fig.suptitle(f"keyword masses: {rows[0]['keywords']}", fontsize=9)
    return _save(fig, path)
