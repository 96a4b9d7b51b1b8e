"""One call: the tables read, the interpolation fitted on the development split, and every
perplexity on the test split (:func:`sketch_model`, what ``jetgraph sketch`` runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.sketch.evaluation import CountLM, perplexities
from jetgraph.applications.sketch.model import META_FILE, SketchLM
from jetgraph.applications.sketch.tables import (
    DEFAULT_BIGRAM_TOP,
    Convention,
    SketchPlan,
    plan_sketch,
    read_sketch,
    reading_convention,
)
from jetgraph.applications.sketch.text import Windows, sample_texts, sampling_rate, split_stream
from jetgraph.capture.config_facts import context_length
from jetgraph.capture.shared import streamed_forward
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram


# ---------------------------------------------------------------------- one call: tables, fit, scores
@dataclass
class SketchReport:
    """What :func:`sketch_model` did: the LM, the plan, the perplexities on the test split and a
    description of the text they were measured on."""

    lm: SketchLM
    plan: SketchPlan
    perplexities: dict[str, float]
    data: dict
    files: list[Path] = field(default_factory=list)


def text_windows(model, tokenizer, text: str | None, samples: int, length: int, seed: int,
                 progress: bool) -> tuple[Windows, Windows, Windows, dict]:
    """Training text, development and test windows: the given ``text`` (tokenised, split in
    order 80/10/10) or ``samples`` texts sampled from the model itself (split 80/10/10 by text)."""
    context = context_length(model)
    if context is not None and length > context:
        raise ValueError(f"length {length} is longer than the model's context of {context} tokens")
    if text is not None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        train, dev, test = split_stream(ids, length)
        return train, dev, test, {"source": "given text", "tokens": int(ids.numel()), "window": length}
    start = [int(i) for i in tokenizer("")["input_ids"]] or [int(i) for i in tokenizer("\n")["input_ids"]]
    if not start:
        raise ValueError("the tokenizer adds no BOS and has no line break to start samples from: give a text")
    end = getattr(tokenizer, "eos_token_id", None)
    pad = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    windows = sample_texts(model, samples, length, start, end, pad=pad, seed=seed, progress=progress)
    cut_dev, cut_test = int(0.8 * samples), int(0.9 * samples)
    if cut_dev == 0 or cut_test == cut_dev or cut_test == samples:
        raise ValueError(f"samples={samples} is too few to split 80/10/10: give at least 10")
    data = {"source": "sampled from the model itself (temperature 1, from its BOS, stopping at its "
                      "end-of-text token)", "texts": samples, "max_length": length, "seed": seed,
            "tokens": windows.tokens}
    return windows.rows(0, cut_dev), windows.rows(cut_dev, cut_test), windows.rows(cut_test, samples), data


def sketch_model(model, tokenizer, prog: ResidualProgram, *, text: str | None = None, samples: int = 1024,
                 length: int = 256, first_tokens: int | None = None, trigram: str = "auto",
                 top: int = 16, max_seconds: float | None = 900.0, seed: int = 0,
                 out: str | Path | None = None, progress: bool = True, on_plan=None,
                 bigram_top: int = DEFAULT_BIGRAM_TOP, convention: Convention = None) -> SketchReport:
    """Read the sketch LM's tables from ``prog`` (the captured ``model``), fit its weights on a
    development split and measure every LM's perplexity on the test split. ``on_plan(plan)`` is
    called before any table is read (the CLI prints it there, and stops for a dry run by
    raising). With ``out``, the tables, ``sketch.json`` and ``perplexities.csv`` are written
    there (the sweeps checkpoint to ``out/bigram.ckpt`` and ``out/trigram.ckpt`` and resume
    from them). ``bigram_top`` / ``top``: tokens kept per bigram / trigram row; ``convention``:
    the tokens put before every context (default: what the tokenizer puts before a text)."""
    with streamed_forward(model):  # a lazily read model samples and scores block by block
        return _sketch_model(model, tokenizer, prog, text, samples, length, first_tokens, trigram, top,
                             max_seconds, seed, out, progress, on_plan, bigram_top, convention)


def _sketch_model(model, tokenizer, prog: ResidualProgram, text: str | None, samples: int, length: int,
                  first_tokens: int | None, trigram: str, top: int, max_seconds: float | None, seed: int,
                  out: str | Path | None, progress: bool, on_plan, bigram_top: int,
                  convention: Convention) -> SketchReport:
    convention = reading_convention(convention, tokenizer)
    sampled = 0 if text is not None else samples * length
    rate = sampling_rate(model, tokenizer) if sampled else 0.0
    total = samples * length if text is None else len(tokenizer(text, add_special_tokens=False)["input_ids"])
    plan = plan_sketch(prog, first_tokens, trigram, top, max_seconds, sampled_tokens=sampled,
                       seconds_per_sampled_token=rate, bigram_top=bigram_top, sample_length=length,
                       convention=convention, scored_tokens=total // 10 + length)
    if on_plan is not None:
        on_plan(plan)
    train, dev, test, data = text_windows(model, tokenizer, text, samples, length, seed, progress)
    lm = read_sketch(prog, first_tokens, plan, progress=progress, resume=out, convention=convention)
    lm.fit_weights(dev)
    counts = CountLM.train(train, lm.vocab)
    counts.fit(dev)
    scores = perplexities(lm, counts, test, model)
    data |= {"train_tokens": train.tokens, "dev_tokens": dev.tokens, "test_tokens": test.tokens,
             "count_bigram_weight": counts.bigram_weight}
    report = SketchReport(lm, plan, scores, data)
    if out is not None:
        folder = Path(out)
        decoded = [tokenizer.decode([a]) for a in lm.first_tokens]
        meta = {"prefix": list(convention.prefix), "first_tokens_text": decoded, "data": data,
                "perplexities": scores}
        report.files.append(lm.save(folder, meta))
        report.files.append(folder / META_FILE)
        rows = "lm,perplexity\n" + "".join(f"\"{name}\",{value:.6g}\n" for name, value in scores.items())
        report.files.append(atomic_write(folder / "perplexities.csv", rows))
        for name in ("bigram.ckpt", "trigram.ckpt"):
            (folder / name).unlink(missing_ok=True)
    return report
