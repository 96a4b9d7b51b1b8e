"""Lens outputs: divergence (overflow: warning + NaN metrics; a finite but diverging series:
warning + flag), the combined CSV, plots with a joint lens, with NaN and with diverging series,
and the cost plan of a lens over prompts held against a measured run."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import jetgraph
from jetgraph.applications import (
    iterative_lens,
    iterative_lenses,
    joint_lens,
    lens_over_prompts,
    plots,
    write_lens_csv,
)
from jetgraph.applications.lens import (
    CSV_COLUMNS,
    DIVERGENCE_REMAINDER,
    LensDivergenceWarning,
    LensResult,
    LensSeriesDivergenceWarning,
    divergent_series,
)
from jetgraph.capture.zoo import ResidualMLP, tiny_model
from jetgraph.passes.metrics import METRICS, per_center_agreement
from tests.conftest import captured, random_ids, require_tinystories

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
    """The lens and its overflow warnings (not the diverging-series ones: see _series)."""
    result, caught = _caught(lambda: iterative_lens(prog, ids, order=order))
    return result, [w for w in caught if w.category is LensDivergenceWarning]


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, list(caught)


def _series(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if w.category is LensSeriesDivergenceWarning]


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
    """At order 8 h_0's logits reach ~1e30: finite, so no overflow warning, and the metrics are
    the real ones (a float32 norm overflows there: cosine 0 and remainder inf); the series is
    flagged as diverging instead."""
    prog, ids = steep
    result, caught = _caught(lambda: iterative_lens(prog, ids, order=DIVERGES - 2))
    assert [w.category for w in caught] == [LensSeriesDivergenceWarning]
    assert result.divergence() == [0, 0, 0] and result.divergent_counts()[0] == ids.shape[1]
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
    prog = jetgraph.capture(model, ids, granularity="block")
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
    assert list(rows[0]) == list(CSV_COLUMNS) and CSV_COLUMNS[-2:] == ("diverged", "divergent")
    assert len(rows) == 4 * 3 + 1
    expected = [(r, line, d, s) for r in results
                for line, d, s in zip(r.table(), r.divergence(), r.divergent_counts(), strict=True)]
    for row, (result, line, diverged, divergent) in zip(rows, expected, strict=True):
        assert (row["lens"], int(row["order"]), row["center"]) == (result.kind, result.order, line["center"])
        assert all(_same(row[m], line[m]) for m in METRICS), row
        assert (int(row["positions"]), int(row["diverged"])) == (ids.shape[1], diverged)
        assert int(row["divergent"]) == divergent >= diverged
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
                      f"joint lens, order 1: {cosine:.3f}", "hatched, ×: " + plots.DIVERGING_LABEL]
    lines = [line for line in curve.get_lines() if line.get_marker() != "x"]  # × marks: diverging
    assert list(lines[3].get_ydata()) == [pytest.approx(cosine)] * 2  # the horizontal joint line
    drawn = lines[2].get_ydata()
    assert math.isnan(drawn[0]) and drawn[-1] == pytest.approx(1.0, abs=1e-5)  # a gap, not a 0
    # order 1 diverges as a series at h_0 (finite): its cells are hatched and its point marked ×
    assert orders[1].divergent[0].all() and not orders[1].diverged.any()
    hatched = [patch for patch in grids[1].patches if patch.get_hatch()]
    assert len(hatched) == int((orders[1].divergent & ~orders[1].diverged).sum())
    marks = [line for line in curve.get_lines() if line.get_marker() == "x"]
    expected = [i for i, row in enumerate(orders[1].divergent & ~orders[1].diverged) if row.any()]
    assert list(marks[0].get_xdata()) == expected and expected[0] == 0


def test_plot_lens_joint_only(steep, tmp_path, figures) -> None:
    prog, ids = steep
    joint = joint_lens(prog, ids, order=0, steps=5)
    plots.plot_lens([joint], tmp_path / "joint.png")
    (figure,) = figures
    assert figure.axes[0].get_images()[0].get_array().shape == (1, 6)
    legend = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    assert len(legend) == 1 and legend[0].startswith("joint lens, order 0: ")


# ------------------------------------------------------------ diverging series
@pytest.fixture(scope="module")
def gemma_steep() -> tuple[jetgraph.ResidualProgram, torch.Tensor]:
    """A tiny Gemma with the norm geometry of the 270M model whose order-2 lens read cosine −0.96
    mid-stack: the last block's update dwarfs the stream before it (down_proj × 1000), and the
    final RMSNorm has a large scale (1 + w, w = 20). Around h_0 and h_1 the decoder's series has
    radius ‖h_ℓ‖/‖h_L − h_ℓ‖ ≪ 1: every jet term is finite, yet they grow with the order."""
    model = tiny_model("gemma")
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1000)
        model.model.norm.weight.add_(20)
    ids = random_ids(2, 8)
    return jetgraph.capture(model, ids, granularity="block"), ids


def test_diverging_series_is_flagged_though_finite(gemma_steep, tmp_path) -> None:
    """Without the criterion nothing here is flagged: every logit is finite (no overflow, no NaN)
    and the metrics are plain numbers, yet the order-2 lens at h_0 and h_1 is a diverging series
    (cosine ≈ 0 at order 2, < −0.5 at order 3, remainder ≫ the logits)."""
    prog, ids = gemma_steep
    lenses, caught = _caught(lambda: iterative_lenses(prog, ids, (0, 1, 2, 3)))
    for lens in lenses.values():  # the overflow check sees nothing
        assert torch.isfinite(lens.logits).all() and lens.divergence() == [0, 0, 0]
        assert all(torch.isfinite(v).all() for v in lens.metrics.values())
    assert [w.category for w in caught] == [LensSeriesDivergenceWarning] * 3  # orders 1, 2, 3
    assert lenses[0].divergent_counts() == [0, 0, 0]  # order 0 is never a diverging series
    tokens = ids.numel()
    assert lenses[2].divergent_counts() == [tokens, tokens, 0]  # every token of h_0, h_1; never h_L
    assert lenses[2].divergent.tolist() == [[True] * 8, [True] * 8, [False] * 8]
    message = _series(caught)[1]
    assert message.startswith("order 2 iterative lens: the Taylor series diverges at 2 of 3 states "
                              "(16 of 24 state-positions: ‖c_2‖ ≥ ‖c_1‖ and remainder > 2× the logits' norm)")
    assert lenses[3].table()[0]["cosine"] < -0.5 and lenses[2].table()[0]["remainder"] > 10
    # sound: a flagged token lies outside the radius of convergence of the RMSNorm decoder's series
    # along h + t·Δ, R = sqrt((mean h² + ε) / mean Δ²) (the roots of the norm's quadratic)
    states = prog.stream(ids)
    radius = torch.stack([(h.pow(2).mean(-1) / (states[-1] - h).pow(2).mean(-1)).sqrt() for h in states])
    for lens in lenses.values():
        assert (radius[lens.divergent_tokens] < 1).all()
    rows = _read(write_lens_csv(list(lenses.values()), tmp_path / "lens.csv"))
    assert [int(r["divergent"]) for r in rows if r["order"] == "2"] == [tokens, tokens, 0]
    assert all(r["diverged"] == "0" and r["cosine"] != "nan" for r in rows)  # metrics kept, flagged


def test_well_behaved_models_are_not_flagged() -> None:
    """Tiny GPT-2 (and tiny Llama): the jets converge (radius > 1 at every state) and no order up to
    4 is flagged, at either granularity."""
    for family in ("gpt2", "llama"):
        _, prog = captured(family)
        ids = random_ids(2, 8)
        for view in (prog.at("block"), prog.at("sublayer")):
            lenses, caught = _caught(lambda v=view, i=ids: iterative_lenses(v, i, range(5)))
            assert caught == [], [str(w.message) for w in caught]
            assert all(not lens.divergent.any() for lens in lenses.values()), family


def test_the_criterion_itself() -> None:
    norms = torch.tensor([[1.0, 0.5, 0.25], [1.0, 3.0, 9.0], [1.0, 3.0, 9.0], [1.0, 2.0, 1.0],
                          [1.0, 0.0, 0.0], [1.0, 3.0, math.nan], [1.0, 3.0, 3.0]])
    remainder = torch.tensor([0.1, 8.0, 1.5, 5.0, 5.0, math.nan, 2.5])
    flagged = [False, True, False, False, False, False, True]  # growth and remainder > 2, both
    assert divergent_series(norms, remainder).tolist() == flagged
    assert not divergent_series(norms[:, :1], remainder).any()  # order 0: one term, never flagged
    assert DIVERGENCE_REMAINDER == 2.0


def test_lens_over_prompts_reports_divergence_once(gemma_steep, tmp_path, figures) -> None:
    prog, _ = gemma_steep
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 5, 6, 8, 4)]
    averages, caught = _caught(lambda: lens_over_prompts(prog, prompts, (0, 2), batch_size=2, progress=False))
    assert len(_series(caught)) == 1 and "order 2 iterative lens over 5 prompts" in _series(caught)[0]
    tokens = sum(len(p) for p in prompts)
    assert averages[2].divergent_counts() == [tokens, tokens, 0]
    assert averages[0].divergent_counts() == [0, 0, 0]
    rows = _read(write_lens_csv(list(averages.values()), tmp_path / "over.csv"))
    assert [r["divergent"] for r in rows] == ["0", "0", "0", str(tokens), str(tokens), "0"]
    plots.plot_lens_average(list(averages.values()), tmp_path / "avg.png")
    (figure,) = figures
    ax = figure.axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert [list(m.get_xdata()) for m in marks] == [[0, 1]]
    assert f"×: {plots.DIVERGING_LABEL} (some prompt)" in [t.get_text() for t in ax.get_legend().get_texts()]


# ----------------------------------------------------------------- cost plan
PLAN_CHILD = r"""
import json, re, sys, time, warnings

import torch
import transformers

import jetgraph
from jetgraph.applications.lens import LensSizes, lens_batch_size, lens_over_prompts, lens_plan


def status(key):
    with open("/proc/self/status") as handle:
        return int(re.search(key + r":\s+(\d+) kB", handle.read()).group(1)) * 1024


vocab = int(sys.argv[1])
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config).eval()
prog = jetgraph.capture(model, torch.randint(0, vocab, (1, 8)), granularity="sublayer")
generator = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, vocab, (n,), generator=generator) for n in (6, 12, 9, 12, 7, 11, 5, 12, 10, 8)]
warnings.simplefilter("ignore")
rss = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the kernel's peak-RSS mark restarts here: the peak above the loaded model
start = time.perf_counter()
sizes = LensSizes.of(prog, (0, 1, 2))
lengths = [len(p) for p in prompts]
plan = lens_plan(sizes, lengths, lens_batch_size(sizes, lengths))
lens_over_prompts(prog, prompts, (0, 1, 2), progress=False)
print("@@" + json.dumps({"seconds": time.perf_counter() - start, "bytes": status("VmHWM") - rss,
                         "planned_seconds": plan.seconds, "planned_bytes": plan.peak_bytes}))
"""
MEMORY_FLOOR = 20e6  # bytes the interpreter may allocate beside the lens (imports, caches)
TIME_FLOOR = 2.0  # seconds of thread-pool start-up and first-call warm-up no plan counts


@pytest.mark.serial
def test_lens_plan_bounds_a_measured_run() -> None:
    """A lens over 10 prompts of a tiny Llama with a 16k vocabulary, run in a child process: its
    time and peak RSS above the loaded model stay under 1.5× what the plan said before the run
    (plus small floors), and the plan is not a wild overestimate either."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", PLAN_CHILD, "16384"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    measured = json.loads(lines[0][2:])
    report = (f"planned {measured['planned_seconds']:.2f} s, {measured['planned_bytes'] / 1e6:.0f} MB; "
              f"measured {measured['seconds']:.2f} s, {measured['bytes'] / 1e6:.0f} MB")
    print(report)
    assert measured["bytes"] <= 1.5 * measured["planned_bytes"] + MEMORY_FLOOR, report
    assert measured["seconds"] <= 1.5 * measured["planned_seconds"] + TIME_FLOOR, report
    assert measured["planned_bytes"] <= 6 * measured["bytes"], report


def test_batch_size_fits_the_memory_budget() -> None:
    from jetgraph.applications.lens import LensSizes, lens_batch_size, lens_plan

    sizes = LensSizes(states=37, orders=(0, 1, 2), vocab=262_144, hidden=640, forward_parameters=1e8)
    lengths = [9, 11, 7, 12, 10, 8, 6, 12]  # 8 short prompts on a Gemma-3-270M-sized lens
    eight = lens_plan(sizes, lengths, 8)
    assert eight.peak_bytes > 24e9 and "in 1 batches of at most 8" in eight.describe()  # the case
    chosen = lens_batch_size(sizes, lengths, budget=4e9)
    assert 1 <= chosen < 8 and lens_plan(sizes, lengths, chosen).peak_bytes <= 4e9
    assert lens_plan(sizes, lengths, chosen + 1).peak_bytes > 4e9  # the most that fits
    assert lens_batch_size(sizes, lengths, budget=1e15) == 8  # never more than asked for
    with pytest.raises(jetgraph.CostError, match=r"one prompt of 12 tokens needs .* more than the memory"):
        lens_batch_size(sizes, lengths, budget=1e8)
    assert lens_plan(sizes, lengths, 2).seconds > lens_plan(sizes, lengths[:4], 2).seconds


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\nThe little dog ran to the park\nShe was happy\n")
    return path


def _error_line(capsys) -> str:
    """The CLI's error: one line (loading progress bars aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jetgraph ")]
    assert len(lines) == 1, lines
    return lines[0]


def _no_loading(monkeypatch) -> None:
    def refuse(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jetgraph, "load_model", refuse)


def test_lens_prompts_dry_run_and_max_time_before_loading(tmp_path, capsys, monkeypatch) -> None:
    from jetgraph.cli import main

    model = str(require_tinystories())
    prompts, png = _prompt_file(tmp_path), tmp_path / "lens.png"
    _no_loading(monkeypatch)
    dry = ["lens", model, "--prompts", str(prompts), "--order", "2", "--out", str(png), "--dry-run"]
    assert main(dry) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan (upper bounds")
    assert "the order-2 lens at 5 states over 3 prompts" in printed
    assert "peak ≈" in printed and "--max-time 60 min (the default) lets it run" in printed
    assert "before loading the model" in printed and not png.exists()
    assert main(["lens", model, "--prompts", str(prompts), "--out", str(png), "--max-time", "1e-6"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("jetgraph lens: error: refusing the order-1 lens")
    assert main(["lens", model, "--prompts", str(prompts), "--max-memory", "1kB"]) == 1  # before loading too
    assert "more than the memory budget of 1 kB" in _error_line(capsys)
    assert "--max-time" in error and "before loading the model" in error and not png.exists()
    assert main(["lens", model, "--prompts", str(prompts), "--max-memory", "lots"]) == 2


def test_lens_prompts_dry_run_and_max_time_after_loading(tmp_path, capsys, monkeypatch) -> None:
    """Without a config.json to plan from, the plan comes after capture, still before any work."""
    import jetgraph.applications.lens.prompts as lens_module  # where lens_over_prompts finds it
    from jetgraph import cli

    def no_work(*_, **__):
        raise AssertionError("the lens ran")

    model = str(require_tinystories())
    prompts, png = _prompt_file(tmp_path), tmp_path / "lens.png"
    monkeypatch.setattr(cli.lens, "folder_facts", lambda _: {})  # no config.json to plan from
    monkeypatch.setattr(lens_module, "iterative_lenses", no_work)
    assert cli.main(["lens", model, "--prompts", str(prompts), "--out", str(png), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "the order-1 lens at 5 states over 3 prompts" in printed and "before loading" not in printed
    assert cli.main(["lens", model, "--prompts", str(prompts), "--out", str(png), "--max-time", "1e-6"]) == 1
    error = _error_line(capsys)
    assert error.startswith("jetgraph lens: error: refusing the order-1 lens") and "raise --max-time" in error
    assert cli.main(["lens", model, "--prompts", str(prompts), "--out", str(png), "--max-memory", "1kB"]) == 1
    assert "more than the memory budget of 1 kB" in _error_line(capsys)
    assert not png.exists()


def test_lens_prompts_runs_and_marks_divergence(tmp_path, capsys) -> None:
    """TinyStories at order 2 over prompts: its h_0 jet diverges (radius ≈ 0.01), so the table marks
    it with * and explains the mark; the CSV carries the count."""
    from jetgraph.cli import main

    model = str(require_tinystories())
    prompts, png, table = _prompt_file(tmp_path), tmp_path / "lens.png", tmp_path / "lens.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LensDivergenceWarning)
        assert main(["lens", model, "--prompts", str(prompts), "--order", "2", "--out", str(png),
                     "--csv", str(table), "--max-memory", "2GB"]) == 0
    printed = capsys.readouterr().out
    h0 = next(line for line in printed.splitlines() if line.startswith("h0 "))
    assert h0.endswith("*") and "* diverged: the jet is a diverging Taylor series" in printed
    rows = [r for r in _read(table) if r["center"] == "h0"]
    assert [r["divergent"] != "0" for r in rows] == [False, True, True] and png.is_file()
