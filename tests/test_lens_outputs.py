"""Lens outputs: divergence at high order (warning + NaN metrics), the combined CSV, plots with a
joint lens and with NaN."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import jetgraph
from jetgraph.applications import iterative_lens, joint_lens, plots, write_lens_csv
from jetgraph.applications.lens import CSV_COLUMNS, METRICS, LensDivergenceWarning, LensResult
from jetgraph.capture.zoo import ResidualMLP
from jetgraph.passes.metrics import per_center_agreement
from tests.conftest import require_tinystories

DIVERGES = 10  # first order at which h_0's jet overflows float32 in the model below


@pytest.fixture(scope="module")
def steep() -> tuple[jetgraph.ResidualProgram, torch.Tensor]:
    """A residual MLP whose updates dwarf its embeddings: the final LayerNorm's Taylor series
    around h_0 has a tiny radius of convergence, so h_0's jet grows ~1e3-1e4 per order and
    overflows at order 10, while h_1's stays finite."""
    torch.manual_seed(0)
    model = ResidualMLP(vocab=50, d=16, hidden=32, layers=2).eval()
    with torch.no_grad():
        model.embed.weight.mul_(1e-3)
        for block in model.blocks:
            block[3].weight.mul_(100)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    return jetgraph.capture(model, ids), ids


def _lens(prog, ids, order: int) -> tuple[LensResult, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = iterative_lens(prog, ids, order=order)
    return result, [w for w in caught if issubclass(w.category, LensDivergenceWarning)]


# ---------------------------------------------------------------- divergence
def test_real_divergence_warns_and_gives_nan(steep) -> None:
    prog, ids = steep
    result, caught = _lens(prog, ids, DIVERGES)
    assert not torch.isfinite(result.logits[0]).all() and torch.isfinite(result.logits[1:]).all()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"order {DIVERGES} iterative lens" in message and "at 1 of 3 states" in message
    assert "metrics are NaN" in message
    assert result.divergence() == [6, 0, 0]
    for name in METRICS:
        assert torch.isnan(result.metrics[name][0]).all(), name  # never a plausible 0
        assert torch.isfinite(result.metrics[name][1:]).all(), name
    row = result.table()[0]
    assert all(math.isnan(row[m]) for m in METRICS)
    assert result.table()[-1]["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_huge_finite_jets_are_measured_not_overflowed(steep) -> None:
    """At order 8 h_0's logits reach ~1e30: finite, so no warning, and the metrics are the real
    ones (a float32 norm overflows there: cosine 0 and remainder inf)."""
    prog, ids = steep
    result, caught = _lens(prog, ids, DIVERGES - 2)
    assert caught == [] and result.divergence() == [0, 0, 0]
    lens, true = result.logits[0, 0].double(), result.true_logits[0].double()
    assert lens.abs().max() > 1e25
    cosine = F.cosine_similarity(lens, true, dim=-1)
    remainder = (true - lens).norm(dim=-1) / true.norm(dim=-1)
    torch.testing.assert_close(result.metrics["cosine"][0], cosine.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.metrics["remainder"][0], remainder.float(), rtol=1e-5, atol=0)
    assert (result.metrics["cosine"][0] != 0).all() and torch.isfinite(result.metrics["remainder"]).all()


def test_nan_only_at_the_diverged_positions() -> None:
    """Non-finite logits at one (centre, position): exactly those metrics are NaN, every other
    one equals the metrics of the untouched logits; the centre's average is NaN."""
    generator = torch.Generator().manual_seed(0)
    true = torch.randn(2, 4, 11, generator=generator)
    logits = torch.randn(3, 2, 4, 11, generator=generator)
    clean = per_center_agreement(logits, true, k=3)
    logits[1, 1, 2, 5] = float("inf")  # centre 1, batch element 1, position 2
    logits[2, 0, 0, 0] = float("nan")  # centre 2, batch element 0, position 0
    expected = r"order 3 iterative lens: the jet diverges at 2 of 3 states \(2 of 12 state-positions"
    with pytest.warns(LensDivergenceWarning, match=expected):
        result = LensResult("iterative", 3, ["a", "b", "c"], logits, true, k=3)
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[1, 2] = bad[2, 0] = True
    assert result.diverged.tolist() == bad.tolist() and result.divergence() == [0, 1, 1]
    for name in METRICS:
        assert torch.isnan(result.metrics[name]).tolist() == bad.tolist(), name
        torch.testing.assert_close(result.metrics[name][~bad], clean[name][~bad])
    table = result.table()
    assert table[0]["cosine"] == round(clean["cosine"][0].mean().item(), 5)
    assert all(math.isnan(table[i][m]) for i in (1, 2) for m in METRICS)


def test_tinystories_diverges_at_order_18() -> None:
    path = require_tinystories()
    model, tokenizer = jetgraph.load_model(str(path))
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids)
    below, caught = _lens(prog, ids, 16)
    assert caught == [] and torch.isfinite(below.metrics["cosine"]).all()
    above, caught = _lens(prog, ids, 18)
    assert len(caught) == 1 and "order 18" in str(caught[0].message)
    assert above.divergence()[0] >= 1 and above.divergence()[1:] == [0, 0]
    assert math.isnan(above.table()[0]["kl"]) and not math.isnan(above.table()[1]["kl"])


# ----------------------------------------------------------------------- CSV
def _read(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _same(text: str, value: float) -> bool:
    return (math.isnan(value) and text == "nan") or float(text) == value


def test_write_lens_csv_has_every_order_and_the_joint_row(steep, tmp_path) -> None:
    prog, ids = steep
    results = [_lens(prog, ids, k)[0] for k in (0, 1, 2, DIVERGES)]
    results.append(joint_lens(prog, ids, order=1, steps=5))
    path = write_lens_csv(results, tmp_path / "out" / "lens.csv")
    rows = _read(path)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 4 * 3 + 1
    expected = [(r, line, d) for r in results for line, d in zip(r.table(), r.divergence(), strict=True)]
    for row, (result, line, diverged) in zip(rows, expected, strict=True):
        assert (row["lens"], int(row["order"]), row["center"]) == (result.kind, result.order, line["center"])
        assert all(_same(row[m], line[m]) for m in METRICS), row
        assert (int(row["positions"]), int(row["diverged"])) == (ids.shape[1], diverged)
    joint = rows[-1]
    assert (joint["lens"], joint["order"], joint["center"]) == ("joint", "1", "Σ weighted centres")
    assert [r["lens"] for r in rows].count("joint") == 1
    assert float(joint["cosine"]) == pytest.approx(results[-1].metrics["cosine"].mean().item(), abs=1e-5)
    assert rows[0]["center"] == "h0" and rows[0]["written_by"] == "embed" and rows[0]["lens"] == "iterative"
    diverged = rows[9]  # order DIVERGES, h_0
    assert diverged["order"] == str(DIVERGES) and diverged["cosine"] == "nan" and diverged["diverged"] == "6"


def test_to_csv_is_one_result_of_write_lens_csv(steep, tmp_path) -> None:
    prog, ids = steep
    result = _lens(prog, ids, 1)[0]
    single = _read(result.to_csv(tmp_path / "one.csv"))
    full = _read(write_lens_csv(result, tmp_path / "full.csv"))
    assert list(single[0]) == ["center", *METRICS]
    assert single == [{k: row[k] for k in ("center", *METRICS)} for row in full]
    with pytest.raises(ValueError, match="at least one"):
        write_lens_csv([], tmp_path / "none.csv")


# --------------------------------------------------------------------- plots
@pytest.fixture
def figures(monkeypatch) -> list:
    """Keep the figures plot_lens draws (instead of closing them) to inspect what it drew."""
    kept: list = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def test_plot_lens_with_joint_and_nan(steep, tmp_path, figures) -> None:
    prog, ids = steep
    orders = [_lens(prog, ids, k)[0] for k in (0, 1, DIVERGES)]
    joint = joint_lens(prog, ids, order=1, steps=5)
    png = plots.plot_lens([*orders, joint], tmp_path / "lens.png", input_ids=ids)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (figure,) = figures
    grids, curve = figure.axes[:3], figure.axes[3]
    images = [ax.get_images()[0].get_array() for ax in grids]
    assert [image.shape for image in images] == [(3, 6), (4, 6), (3, 6)]  # the joint row under order 1
    assert images[2].mask[0].all() and not images[2].mask[1:].any()  # diverged h_0: gray cells
    assert not images[0].mask.any() and not images[1].mask.any()
    assert [t.get_text() for t in grids[1].get_yticklabels()][-1] == "joint lens"
    assert "1 of 3 states diverge" in grids[2].get_title()
    legend = [t.get_text() for t in curve.get_legend().get_texts()]
    cosine = joint.metrics["cosine"].mean().item()
    assert legend == ["order 0", "order 1", f"order {DIVERGES} (1 diverged)",
                      f"joint lens, order 1: {cosine:.3f}"]
    lines = curve.get_lines()
    assert list(lines[3].get_ydata()) == [pytest.approx(cosine)] * 2  # the horizontal joint line
    drawn = lines[2].get_ydata()
    assert math.isnan(drawn[0]) and drawn[-1] == pytest.approx(1.0, abs=1e-5)  # a gap, not a 0


def test_plot_lens_joint_only(steep, tmp_path, figures) -> None:
    prog, ids = steep
    joint = joint_lens(prog, ids, order=0, steps=5)
    plots.plot_lens([joint], tmp_path / "joint.png")
    (figure,) = figures
    assert figure.axes[0].get_images()[0].get_array().shape == (1, 6)
    legend = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    assert len(legend) == 1 and legend[0].startswith("joint lens, order 0: ")
