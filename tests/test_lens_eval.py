"""The lens benchmark's CI-sized run (``python benchmarks/lens_eval.py --ci``) on TinyStories-656K:
every lens scored at every state on faithfulness and on one concept set (with the leakage control
and the chance baseline), the two Jacobian fits equal, the numbers what their names say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require_tinystories

ROOT = Path(__file__).resolve().parents[1]


def test_the_ci_sized_lens_benchmark_runs_and_writes_its_tables(tmp_path: Path) -> None:
    model = require_tinystories()
    out = tmp_path / "lens_eval.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "lens_eval.py"), "--ci", "--model", str(model),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    lenses = result["faithfulness"]
    assert set(lenses) >= {"logit", "iterative k=1 (reads h_N)", "jacobian (per input)", "averaged jacobian",
                           "tuned"}
    for entry in lenses.values():
        assert list(entry["states"]) == result["states"] == ["h0", "h1", "h2", "h3"]
        for state in entry["states"].values():
            for metric in ("kl", "top1"):
                low, mean, high = state[metric]["low"], state[metric]["mean"], state[metric]["high"]
                assert low <= mean <= high
            assert state["kl"]["low"] >= 0 and 0 <= state["top1"]["mean"] <= 1
    costs = result["jacobian_fit_forward_vs_reverse"]
    assert costs["max_abs_difference"] <= 1e-5 * max(1.0, costs["scale"])
    assert "| logit |" in done.stdout and "Top-1 agreement" in done.stdout
    concepts = result["concepts"]  # the CI-sized run scores one set with every lens and the fitted two
    assert list(concepts["sets"]) == ["arithmetic_ordering"]
    assert concepts["sets"]["arithmetic_ordering"]["items"] >= 40
    assert set(concepts["lenses"]) == {"logit", "iterative", "ahead", "jacobian",
                                       "averaged_jacobian (fitted)", "tuned (fitted)"}
    assert set(concepts["controls"]) == {"iterative", "ahead"}
    for per_set in [*concepts["lenses"].values(), *concepts["controls"].values()]:
        for part in ("intermediate", "answer", "other_intermediate", "other_answer"):
            shares = [per_set["arithmetic_ordering"][part][f"pass@{k}"]["pass"] for k in (1, 5, 10)]
            assert all(0 <= v <= 1 for v in shares) and shares == sorted(shares)  # pass@k grows with k
    assert "Leakage control" in done.stdout and "Chance baseline" in done.stdout
    assert not list(tmp_path.glob("*.png"))  # writes only where --out says


def test_the_concept_tables_print_a_set_nothing_could_score() -> None:
    """A tokenizer that scores no answer of a set (TinyStories on capitals): a dash, not a crash."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lens_eval", ROOT / "benchmarks" / "lens_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    empty = {f"pass@{k}": {"pass": None, "first_state": None, "items": 0} for k in (1, 5, 10)}
    part = {"intermediate": empty, "answer": empty, "other_intermediate": empty, "other_answer": empty}
    unscored = {"items": 0, "pass@1": None, "pass@5": None, "pass@10": None}
    concepts = {"sets": {"capitals": {"items": 40}}, "states": ["h0"], "controls": {},
                "lenses": {"logit": {"capitals": part}}, "model": {"capitals": unscored},
                "model_on_control_prompts": {"capitals": unscored}, "seconds_per_prompt": {"logit": 0.01}}
    text = "\n".join(module.concept_tables(concepts))
    assert "| logit | – / – |" in text
    assert "| model's own answer (pass@1 / @10 at the prompt's end) | – |" in text
