"""The paper's analysis tables, measured here: component roles (a planted rule, TinyStories-656K,
SmolLM2), training dynamics (checkpoint curves), a fine-tuning diff scored against a count-based
corpus diff, and keyword masses on the base and fine-tuned pair.

    python benchmarks/analyses.py                     # everything; ~20 min on 2 cores
    python benchmarks/analyses.py --skip-smollm2      # without the 135M model
    python benchmarks/analyses.py --only planted tinystories_roles   # rerun sections into analyses.json
    python benchmarks/analyses.py --models /tmp/an    # also keep the fine-tuned model and checkpoints

Writes benchmarks/results/analyses.json and the PNGs under docs/img/analyses_*.png (or under
``--out``); the fine-tuned TinyStories model and the checkpoint folders go to ``--models``
(default: a temporary folder, removed at the end), so the CLI commands in docs/analyses.md can be
rerun on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from jetgraph.applications.curves import checkpoint_curves
from jetgraph.applications.diffs import corpus_diff, model_diff, precision_at
from jetgraph.applications.groundtruth import TinyConfig, bpe_corpus, pydoc_text, tiny_gpt2, train
from jetgraph.applications.groundtruth.planted import planted_rule_model
from jetgraph.applications.groundtruth.training import window_batches
from jetgraph.applications.masses import keyword_masses, masses_table
from jetgraph.applications.ngrams import InputConvention, keyword_ids, load_keywords
from jetgraph.applications.plots import plot_diff, plot_masses, plot_roles
from jetgraph.applications.roles import attention_units, unit_roles, verify_roles
from jetgraph.applications.sketch import sample_texts
from jetgraph.applications.targets import target_tokens, token_label
from jetgraph.capture import capture, load_model

ROOT = Path(__file__).resolve().parent.parent
TINYSTORIES = ROOT.parent / "shared" / "models" / "tinystories-656k"
PYTHON_WORDS = ["def", "return", "import", "class", "module", "function", "argument", "object", "string",
                "exception", "attribute", "method", "None", "True", "False", "self", "print", "dict",
                "tuple", "syntax", "keyword", "expression", "statement", "operator", "integer"]


def role_summary(report, tokenizer=None) -> dict:
    """The JSON of a role report: its rows, the best unit and the rank agreement."""
    return {"targets": report.targets.describe(tokenizer), "positions": report.positions, "rows": report.rows,
            "controls": report.controls, "reference_E_U": report.reference.score,
            "best": "+".join(report.best().units), "rank_agreement_zero": report.rank_agreement("zero"),
            "rank_agreement_mean": report.rank_agreement("mean"), "table": report.rows_out(tokenizer)}


def planted_study(seeds: int) -> dict:
    """The planted rule in every MLP of a 3-layer model, over seeds: is it found?"""
    runs = []
    for seed in range(seeds):
        for layer in range(3):
            start = time.perf_counter()
            cfg = TinyConfig(vocab=64, n_layer=3, seq=32, steps=200, n_embd=64, seed=seed)
            model, rule, text = planted_rule_model(cfg, layer=layer)
            prog = capture(model, text[:1, :8])
            report = verify_roles(prog, unit_roles(prog, [rule.target], progress=False), text, progress=False,
                                  attention=True)
            zero = {s.units[0]: report.effect(s.units, "zero").mean for s in report.singles}
            attention_zero = {u[0]: report.effect(u, "zero").mean for u in report.unranked()}
            others = {"+".join(u): report.effect(u, "zero").others
                      for u in [s.units for s in report.singles] + report.unranked()}
            specific = {u: (zero | attention_zero)[u] - others[u] for u in others}
            stream = unit_roles(prog, [rule.target], progress=False, start="stream",
                                convention=InputConvention())  # trained without a start token
            runs.append({"seed": seed, "planted_in": rule.unit, "ranked_first": report.best().units[0],
                         "ranked_first_stream_start": stream.best().units[0],
                         "scores_stream_start": {s.units[0]: s.score for s in stream.singles},
                         "largest_zero_ablation": min(zero, key=zero.get), "zero_dlogit": zero,
                         "attention_zero_dlogit": attention_zero, "zero_dlogit_others": others,
                         "largest_specific_drop": min(specific, key=specific.get),
                         "scores": {s.units[0]: s.score for s in report.singles},
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"  planted in {rule.unit} (seed {seed}): ranked first {report.best().units[0]} "
                  f"(stream start: {stream.best().units[0]}), largest "
                  f"zero-ablation drop {runs[-1]['largest_zero_ablation']} ({zero[rule.unit]:+.2f}, "
                  f"others {others[rule.unit]:+.2f}; attention {min(attention_zero.values()):+.2f})")
            if seed == 0 and layer == 1:
                plot_roles(report, IMG / "analyses_roles_planted.png")
    found = sum(r["ranked_first"] == r["planted_in"] for r in runs)
    stream_found = sum(r["ranked_first_stream_start"] == r["planted_in"] for r in runs)
    ablation = sum(r["largest_zero_ablation"] == r["planted_in"] for r in runs)
    specific = sum(r["largest_specific_drop"] == r["planted_in"] for r in runs)
    return {"runs": runs, "ranked_first": f"{found}/{len(runs)}",
            "ranked_first_stream_start": f"{stream_found}/{len(runs)}",
            "largest_zero_ablation": f"{ablation}/{len(runs)}",
            "largest_specific_drop": f"{specific}/{len(runs)}"}


def tinystories_roles(model, tokenizer, prog) -> dict:
    windows = sample_texts(model, 256, 128, [1], 2, pad=0, seed=0, progress=False)
    out = {}
    for spec in ("ing", "ed"):
        targets = target_tokens(spec, 2048, tokenizer)
        report = unit_roles(prog, targets, progress=False)
        verify_roles(prog, report, windows.ids, windows.mask.long(), progress=False, attention=True)
        print(report.table(tokenizer))
        out[spec] = role_summary(report, tokenizer)
        if spec == "ing":
            plot_roles(report, IMG / "analyses_roles_tinystories.png", tokenizer)
    return out


def smollm2_roles() -> dict:
    model, tokenizer = load_model("smollm2")
    prog = capture(model)
    text, _ = pydoc_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    targets = target_tokens("ing", int(prog.decoder.unembedding.shape[0]), tokenizer)
    # SmolLM2 writes most -ing words whole; the bare piece follows rare stems: take the windows of
    # 128 tokens (from a 64-token grid) that hold one, at most 48
    hits = torch.isin(ids, torch.tensor(targets.ids)).nonzero()[:, 0]
    starts = sorted({max(0, min(int(h) - 64, ids.numel() - 128)) // 64 * 64 for h in hits})[:48]
    windows = torch.stack([ids[s:s + 128] for s in starts])
    start = time.perf_counter()
    report = unit_roles(prog, targets, rows=4096, pairs=6, tokenizer=tokenizer)  # the 4096 it predicts most
    ranked = time.perf_counter() - start
    verify_roles(prog, report, windows, units=[s.units for s in report.singles[:8]] +
                 [s.units for s in report.singles[-3:]] + [p.units for p in report.pairs[:3]])
    # the 30 attention units, zero-ablated only (each costs a forward pass over the windows)
    verify_roles(prog, report, windows, units=[(u,) for u in attention_units(prog)], methods=("zero",))
    print(report.table(tokenizer))
    plot_roles(report, IMG / "analyses_roles_smollm2.png", tokenizer)
    text_used = f"{len(starts)} windows of 128 tokens of pydoc_data.topics holding a target"
    return role_summary(report, tokenizer) | {"rank_seconds": round(ranked, 1),
                                              "total_seconds": round(time.perf_counter() - start, 1),
                                              "text": text_used}


def fine_tune(model, ids: torch.Tensor, steps: int, at: tuple[int, ...]):
    """AdamW on windows of the new text, every parameter; frozen copies at the steps in ``at``."""
    tuned = copy.deepcopy(model).train()
    batches = window_batches(ids, 16, 128, 0)
    snapshots, losses = train(tuned, batches, steps, 1e-3, at)
    return tuned.eval(), snapshots, losses


def held_out_loss(model, ids: torch.Tensor) -> float:
    rows = ids[: ids.numel() // 128 * 128].view(-1, 128)[:32]
    with torch.no_grad():
        return float(model(input_ids=rows, labels=rows).loss)


def diff_study(model, tokenizer, models_dir: Path, steps: int) -> dict:
    """Fine-tune TinyStories-656K on pydoc text; diff, precision@50 against the corpus diff,
    keyword masses, and the fine-tuning's checkpoint curves."""
    text, source = pydoc_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    split = int(0.9 * ids.numel())
    train_ids, held = ids[:split], ids[split:]
    start = time.perf_counter()
    at = (0, steps // 8, steps // 4, steps // 2, steps)
    tuned, snapshots, losses = fine_tune(model, train_ids, steps, at)
    tune_seconds = time.perf_counter() - start
    tuned.save_pretrained(models_dir / "tinystories-pydoc")
    tokenizer.save_pretrained(models_dir / "tinystories-pydoc")
    for step, snap in snapshots.items():
        snap.save_pretrained(models_dir / "finetune" / f"step{step}")
    losses_out = {"base_on_pydoc": held_out_loss(model, held), "tuned_on_pydoc": held_out_loss(tuned, held)}
    base_samples = sample_texts(model, 1024, 128, [1], 2, pad=0, seed=1, progress=False)
    base_ids = base_samples.ids[base_samples.mask]
    reference = corpus_diff(base_ids, train_ids, 2048, top=500, min_count=5)
    prog_a, prog_b = capture(model), capture(tuned)
    convention = InputConvention.from_tokenizer(tokenizer)  # TinyStories' BOS, before every context
    result = {"fine_tune": {"text": source, "train_tokens": int(train_ids.numel()), "steps": steps,
                            "batch": "16 x 128 tokens", "lr": 1e-3, "seconds": round(tune_seconds, 1),
                            "first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20, **losses_out},
              "base_corpus": f"{base_ids.numel():,} tokens sampled from the base model (1024 texts)",
              "reference": "top 500 bigrams by smoothed joint log-ratio, pydoc train split vs base samples, "
                           "count >= 5", "diffs": {}}
    chance = 500 / 2048 ** 2
    for path in ("h_last→U", "E→U", "E→MLP_last→U"):
        for rank in ("prob", "log_ratio"):
            start = time.perf_counter()
            diff = model_diff(prog_a, prog_b, path, top=50, rank=rank, names=("TinyStories-656K", "+pydoc"),
                              progress=False, convention=convention)
            precision = precision_at(diff.pairs("increase"), reference, 50)
            result["diffs"][f"{path} / {rank}"] = {
                "precision_at_50": precision, "seconds": round(time.perf_counter() - start, 1),
                "top": [f"{e['context_text']!r}→{e['next_text']!r} {e['p_a']:.3f}→{e['p_b']:.3f}"
                        for e in diff.entries("increase", tokenizer)[:12]]}
            print(f"  diff {path} ranked by {rank}: precision@50 {precision:.2f} (chance {chance:.1e})")
            if path == "h_last→U" and rank == "prob":
                plot_diff(diff, IMG / "analyses_diff.png", tokenizer)
                print(diff.table(tokenizer, 8))
    result["chance_precision"] = chance
    result["corpus_top"] = [f"{token_label(tokenizer, a)!r}→{token_label(tokenizer, b)!r}"
                            for a, b in reference[:12]]
    programs = {"TinyStories-656K": prog_a, "+ pydoc fine-tune": prog_b}
    masses = {}
    for label, words in (("python words", PYTHON_WORDS), ("toxic", load_keywords("toxic"))):
        ids_k = keyword_ids(tokenizer, words)
        rows = keyword_masses(programs, ids_k, label=f"{label} ({len(ids_k)} tokens)", convention=convention)
        print(masses_table(rows))
        masses[label] = rows
        if label == "python words":
            plot_masses(rows, IMG / "analyses_masses.png")
    result["masses"] = masses
    steps_sorted = sorted(snapshots)
    curves = checkpoint_curves([capture(snapshots[s]) for s in steps_sorted], k=100,
                               labels=[f"step{s}" for s in steps_sorted], steps=steps_sorted, progress=False,
                               convention=convention)
    curves.plot(IMG / "analyses_curves_finetune.png", "TinyStories-656K fine-tuned on pydoc: top-100 bigrams")
    print(curves.table())
    result["finetune_curves"] = curves.rows
    return result


def text_run_curves(models_dir: Path, steps: int) -> dict:
    """A longer run from scratch: a tiny GPT-2 on pydoc text (BPE 512), checkpoints over training."""
    text, source = pydoc_text()
    corpus = bpe_corpus(text, 512, source)
    cfg = TinyConfig(vocab=corpus.vocab, n_embd=64, n_layer=2, seq=64, steps=steps, seed=0)
    at = tuple(sorted({s for s in (0, 25, 50, 100, 200, 400, 800) if s < steps} | {steps}))
    start = time.perf_counter()
    snapshots, losses = train(tiny_gpt2(cfg), window_batches(corpus.train_ids, cfg.batch, cfg.seq, 0), steps,
                              cfg.lr, at)
    trained = time.perf_counter() - start
    for step, model in snapshots.items():
        model.save_pretrained(models_dir / "pydoc-tiny" / f"step{step}")
    out = {}
    for path in ("h_last→U", "E→U"):
        curves = checkpoint_curves([capture(snapshots[s]) for s in at], path, k=100,
                                   labels=[f"step{s}" for s in at], steps=list(at), progress=False,
                                   convention=InputConvention())  # trained without a start token
        print(curves.table())
        out[path] = curves.rows
        if path == "h_last→U":
            curves.plot(IMG / "analyses_curves_text.png",
                        "tiny GPT-2 on pydoc text (BPE 512): top-100 bigrams")
    return {"source": source, "steps": steps, "train_seconds": round(trained, 1), "last_loss": losses[-1],
            "curves": out}


def main(argv: list[str] | None = None) -> dict:
    global IMG
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="write analyses.json and the PNGs here (default: benchmarks/results, docs/img)")
    parser.add_argument("--models", type=Path, default=None, help="keep the trained models here")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the planted-rule study")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--text-steps", type=int, default=1600)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"rerun these sections alone ({', '.join(SECTIONS)}), updating the existing "
                             "analyses.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    IMG = args.out or ROOT / "docs" / "img"
    IMG.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory() if args.models is None else None
    models_dir = args.models or Path(scratch.name)
    begin = time.perf_counter()
    payload: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                f"torch {torch.__version__}",
                     "command": "python benchmarks/analyses.py "
                                + " ".join(sys.argv[1:] if argv is None else argv)}
    out = (args.out or ROOT / "benchmarks" / "results") / "analyses.json"
    sections = args.only or [s for s in SECTIONS if not (args.skip_smollm2 and s == "smollm2_roles")]
    tinystories = None
    if args.only:
        payload = json.loads(out.read_text()) | {f"{name}_command": payload["command"] for name in args.only}
    for name in sections:
        print(name)
        section_start = time.perf_counter()
        if name == "planted":
            payload[name] = planted_study(args.seeds)
        elif name == "smollm2_roles":
            payload[name] = smollm2_roles()
        else:
            if tinystories is None:
                model, tokenizer = load_model(TINYSTORIES)
                tinystories = model, tokenizer
            model, tokenizer = tinystories
            if name == "tinystories_roles":
                payload[name] = tinystories_roles(model, tokenizer, capture(model))
            elif name == "finetune":
                payload[name] = diff_study(model, tokenizer, models_dir, args.finetune_steps)
            else:
                payload[name] = text_run_curves(models_dir, args.text_steps)
        payload.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_start, 1)
    if not args.only:
        payload["seconds"] = round(time.perf_counter() - begin, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {out} in {time.perf_counter() - begin:.1f} s")
    if scratch is not None:
        scratch.cleanup()
    return payload


IMG = ROOT / "docs" / "img"
SECTIONS = ("planted", "tinystories_roles", "finetune", "text_run", "smollm2_roles")

if __name__ == "__main__":
    main()
