"""A jet n-gram language model: an interpolated n-gram LM built only from read-outs of a model.

The paper calls reading n-gram tables off the weights "sketching" the model; this makes it
quantitative. Three data-free tables are read from a captured model:

- **bigram**: the default read-out (:mod:`jetgraph.applications.ngrams.readout`), the model's own
  next-token distribution after each token, averaged over the first tokens it expects, [V, V];
- **trigram** (when affordable): the model's prediction for every token pair (a, b), kept as each
  row's top ``k`` tokens; the rest of a row's mass backs off to the bigram;
- **unigram**: the bigram table's rows averaged (what follows a token drawn uniformly), so no
  corpus enters the tables. (The table's stationary distribution, π = π B, scored worse: on
  TinyStories-656K the sketch's perplexity was 608 with it against 598.)

p(c | a, b) = λ₃ p₃(c | a, b) + λ₂ p₂(c | b) + λ₁ p₁(c), each part normalised, so the mixture is
a distribution. The λ are the only numbers fitted to text: on a development split, never on the
text the perplexities are measured on. :func:`perplexities` compares the sketch with the model
itself, with count-based bigram and unigram LMs trained on the same text, and with the sketch's
parts alone.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.ngrams import full_table, ngram_table
from jetgraph.applications.ngrams.readout import (
    DEFAULT_FIRST_TOKENS,
    DEFAULT_READOUT,
    bigram_readout,
    expected_first_tokens,
)
from jetgraph.errors import CostError
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram

WEIGHT_STEP = 0.05
PLAN_ROWS = 1024
TABLES_FILE = "sketch.safetensors"
META_FILE = "sketch.json"


@dataclass
class SketchLM:
    """The tables and interpolation weights of a jet n-gram LM over a vocabulary of ``vocab``.

    ``bigram`` [V, V] and ``unigram`` [V] are probabilities (float64); ``trigram_index`` / ``trigram_prob``
    [V·V, k] hold row a·V + b's top tokens and their probabilities (None without a trigram);
    ``weights`` are (λ₃, λ₂, λ₁); ``first_tokens`` the tokens the bigram read-out was averaged
    over."""

    unigram: torch.Tensor
    bigram: torch.Tensor
    trigram_index: torch.Tensor | None = None
    trigram_prob: torch.Tensor | None = None
    weights: tuple[float, float, float] = (0.0, 0.9, 0.1)
    first_tokens: list[int] = field(default_factory=list)

    @property
    def vocab(self) -> int:
        return int(self.unigram.shape[0])

    @property
    def has_trigram(self) -> bool:
        return self.trigram_index is not None

    # ------------------------------------------------------------------ probabilities
    def parts(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """p₁, p₂, p₃ of every token of ``windows`` [n, L] from position 1 on, each [n, L − 1]
        (float64); p₃ at position 1, which has no token two back, is p₂."""
        windows = windows.long()
        prev, nxt = windows[:, :-1], windows[:, 1:]
        p1 = self.unigram.double()[nxt]
        p2 = self.bigram.double()[prev, nxt]
        p3 = p2.clone()
        if self.has_trigram and windows.shape[1] > 2:
            p3[:, 1:] = self._trigram(windows[:, :-2], windows[:, 1:-1], windows[:, 2:])
        return {"unigram": p1, "bigram": p2, "trigram": p3}

    def _trigram(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p₃(c | a, b): the kept probability when c is among row (a, b)'s top tokens, else the
        row's remaining mass spread over the other tokens in proportion to the bigram p₂(· | b)."""
        rows = (a * self.vocab + b).reshape(-1)
        index, prob = self.trigram_index[rows].long(), self.trigram_prob[rows].double()
        flat_c = c.reshape(-1)
        hit = index == flat_c[:, None]
        kept = (prob * hit).sum(-1)
        bigram_b = self.bigram.double()[b.reshape(-1)]
        covered = bigram_b.gather(1, index).sum(-1)
        rest = (1 - prob.sum(-1)).clamp_min(0) * bigram_b.gather(1, flat_c[:, None])[:, 0] \
            / (1 - covered).clamp_min(1e-12)
        return torch.where(hit.any(-1), kept, rest).view(c.shape)

    def mix(self, parts: dict[str, torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
        """The interpolated probability of every scored token, from :meth:`parts`."""
        l3, l2, l1 = self.weights if weights is None else weights
        mixed = l3 * parts["trigram"] + l2 * parts["bigram"] + l1 * parts["unigram"]
        first = (l2 + l3) * parts["bigram"][:, :1] + l1 * parts["unigram"][:, :1]  # no token two back
        return torch.cat([first, mixed[:, 1:]], 1)

    def distribution(self, history: Sequence[int]) -> torch.Tensor:
        """The full next-token distribution [V] (float64) after ``history`` (≥ 1 token): what the
        LM's probabilities are, summed over the vocabulary in tests."""
        history = [int(t) for t in history]
        if not history:
            raise ValueError("the sketch LM conditions on at least one token")
        candidates = torch.arange(self.vocab)
        tail = history[-2:]
        windows = torch.tensor([[*tail, c] for c in candidates.tolist()])
        probs = self.mix(self.parts(windows))
        return probs[:, -1]

    def fit_weights(self, dev: Windows, step: float = WEIGHT_STEP) -> tuple[float, float, float]:
        """Set (and return) the λ that maximise the likelihood of the ``dev`` windows (a
        development split), over a grid of the simplex (λ₃ = 0 without a trigram); every
        λ₁ ≥ ``step``, so no token ever gets probability 0."""
        parts = self.parts(dev.ids)
        steps = round(1 / step)
        best, best_ll = self.weights, -math.inf
        for i, j in itertools.product(range(steps + 1), repeat=2):
            l3, l2 = i * step, j * step
            l1 = 1 - l3 - l2
            if l1 < step - 1e-9 or (l3 > 0 and not self.has_trigram):
                continue
            ll = float(self.mix(parts, (l3, l2, l1))[dev.scored].clamp_min(1e-300).log().sum())
            if ll > best_ll:
                best, best_ll = (l3, l2, l1), ll
        self.weights = tuple(round(w, 6) for w in best)  # type: ignore[assignment]
        return self.weights

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        """The tables as ``sketch.safetensors``; the weights, first tokens and ``meta`` as ``sketch.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"unigram": self.unigram.double().contiguous(), "bigram": self.bigram.double().contiguous()}
        if self.has_trigram:
            tensors["trigram_index"] = self.trigram_index.int().contiguous()
            tensors["trigram_prob"] = self.trigram_prob.float().contiguous()
        atomic_write(folder / TABLES_FILE, lambda temporary: save_file(tensors, temporary))
        info = {"weights": list(self.weights), "first_tokens": self.first_tokens, "vocab": self.vocab,
                "trigram_top": int(self.trigram_index.shape[1]) if self.has_trigram else 0} | (meta or {})
        atomic_write(folder / META_FILE, json.dumps(info, indent=1, ensure_ascii=False) + "\n")
        return folder / TABLES_FILE

    @classmethod
    def load(cls, folder: str | Path) -> SketchLM:
        from safetensors.torch import load_file

        folder = Path(folder)
        tensors = load_file(str(folder / TABLES_FILE))
        info = json.loads((folder / META_FILE).read_text())
        return cls(tensors["unigram"], tensors["bigram"], tensors.get("trigram_index"),
                   tensors.get("trigram_prob"), tuple(info["weights"]), list(info["first_tokens"]))


# ---------------------------------------------------------------------- reading the tables
@dataclass(frozen=True)
class SketchPlan:
    """What reading the tables costs: rows, FLOPs and seconds of each table and the trigram's
    memory; ``trigram`` says whether it is read."""

    vocab: int
    bigram_seconds: float
    trigram_rows: int
    trigram_seconds: float
    trigram_bytes: int
    trigram: bool
    reason: str = ""
    sampled_tokens: int = 0
    sampling_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.bigram_seconds + self.sampling_seconds + (self.trigram_seconds if self.trigram else 0.0)

    def describe(self) -> str:
        from jetgraph.cost import format_bytes, format_count, format_duration

        tri = (f"trigram: {format_count(self.trigram_rows)} pairs, ~{format_duration(self.trigram_seconds)}, "
               f"{format_bytes(self.trigram_bytes)}" + ("" if self.trigram else f" - skipped: {self.reason}"))
        sampling = (f"sampling up to {format_count(self.sampled_tokens)} tokens from the model, at most "
                    f"~{format_duration(self.sampling_seconds)}; " if self.sampled_tokens else "")
        return (f"{sampling}bigram: {format_count(self.vocab)} tokens, "
                f"~{format_duration(self.bigram_seconds)}; {tri}; total ~{format_duration(self.seconds)}")


def plan_sketch(prog: ResidualProgram, first_tokens: int = DEFAULT_FIRST_TOKENS, trigram: str = "auto",
                top: int = 16,
                max_seconds: float | None = 900.0, max_bytes: float = 2e9, sampled_tokens: int = 0,
                seconds_per_sampled_token: float = 0.0) -> SketchPlan:
    """Cost the tables before computing any (two chunks of pairs timed here), and the sampling
    of ``sampled_tokens`` at ``seconds_per_sampled_token`` (timed by :func:`sampling_rate`).
    ``trigram``: ``"auto"`` reads it when it fits ``max_seconds`` and ``max_bytes``, ``"on"``
    refuses (:class:`CostError`) when it does not, ``"off"`` never reads it. Everything together
    past ``max_seconds`` is refused."""
    if trigram not in ("auto", "on", "off"):
        raise ValueError(f"trigram must be 'auto', 'on' or 'off', got {trigram!r}")
    vocab = int(prog.decoder.unembedding.shape[0])
    dense = vocab * vocab * 8
    if dense > max_bytes:
        raise CostError(f"the bigram table has {vocab:,}² entries ({dense / 1e9:.1f} GB), more than "
                        f"{max_bytes / 1e9:.1f} GB: the sketch LM holds it dense; use jetgraph ngrams "
                        "for top entries of large vocabularies")
    pair_rows = vocab * vocab
    per_row = _seconds_per_row(prog, _pair_contexts(vocab, 0, min(pair_rows, 2 * PLAN_ROWS)))
    bigram_seconds = per_row * vocab * (first_tokens + 1)  # the expected first tokens, then the mixture
    seconds = per_row * pair_rows
    memory = pair_rows * top * 12  # indices (long) and logits (float32) while sweeping
    reason = ""
    if trigram == "off":
        reason = "--trigram off"
    elif max_seconds is not None and seconds > max_seconds:
        reason = f"estimated {seconds:,.0f} s, more than the {max_seconds:,.0f} s allowed"
    elif memory > max_bytes:
        reason = f"needs {memory / 1e9:.1f} GB, more than {max_bytes / 1e9:.1f} GB"
    if reason and trigram == "on":
        raise CostError(f"refusing the trigram table of {pair_rows:,} pairs: {reason}; use --trigram auto "
                        "or off, or raise --max-time")
    sampling = sampled_tokens * seconds_per_sampled_token
    plan = SketchPlan(vocab, bigram_seconds, pair_rows, seconds, memory, not reason, reason, sampled_tokens,
                      sampling)
    if max_seconds is not None and plan.seconds > max_seconds:
        raise CostError(f"refusing the sketch: {plan.describe()}; more than the {max_seconds:,.0f} s allowed "
                        "(sample fewer texts, --trigram off, or raise --max-time)")
    return plan


@torch.no_grad()
def read_sketch(prog: ResidualProgram, first_tokens: int = DEFAULT_FIRST_TOKENS,
                plan: SketchPlan | None = None, top: int = 16, chunk: int = 1024, progress: bool = True,
                resume: str | Path | None = None) -> SketchLM:
    """The tables of the sketch LM, read from ``prog`` (the trigram only when ``plan`` says so).
    ``resume``: a checkpoint file for the trigram sweep (an interrupted run continues)."""
    vocab = int(prog.decoder.unembedding.shape[0])
    plan = plan or plan_sketch(prog, first_tokens, "off", max_seconds=None)
    bigram = bigram_readout(prog, first_tokens, chunk=chunk).exp()  # float64: rows sum to 1 to rounding
    first = expected_first_tokens(prog, first_tokens, chunk=chunk)[0] if first_tokens else []
    unigram = bigram.mean(0)  # every token equally likely as the context
    index = prob = None
    if plan.trigram:
        pairs = _pair_contexts(vocab, 0, vocab * vocab)
        table = ngram_table(prog, DEFAULT_READOUT, contexts=pairs, top=1, row_top=top, normalise=True,
                            chunk=chunk, progress=progress, resume=resume, max_seconds=None, shard=None)
        row_max, log_sum = table.row_max.double()[:, None], table.log_sum.double()[:, None]
        log_q = (table.row_values.double() - row_max) - log_sum
        index, prob = table.row_index.int(), log_q.exp().float()
    return SketchLM(unigram, bigram, index, prob, (0.0, 0.9, 0.1), first)


def _seconds_per_row(prog: ResidualProgram, rows: torch.Tensor) -> float:
    """Seconds per context row of the read-out, timed here on the second of two chunks (the
    first warms up), so the estimate is this machine's, under its present load."""
    half = max(1, len(rows) // 2)
    full_table(prog, DEFAULT_READOUT, contexts=rows[:half], chunk=half)
    start = time.perf_counter()
    full_table(prog, DEFAULT_READOUT, contexts=rows[half:], chunk=half)
    return (time.perf_counter() - start) / max(1, len(rows) - half)


def _pair_contexts(vocab: int, start: int, end: int) -> torch.Tensor:
    """Rows start..end of the pair grid (a, b), row a·V + b."""
    rows = torch.arange(start, end)
    return torch.stack([rows // vocab, rows % vocab], 1)


# ---------------------------------------------------------------------- text to score on
@dataclass(frozen=True)
class Windows:
    """Token windows ``ids`` [n, L] and ``mask`` [n, L] of real tokens (False: padding). Every LM
    is scored on the same tokens: the real ones at positions 1.. (:attr:`scored`)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor) -> Windows:
        ids = ids.long().view(1, -1) if ids.dim() == 1 else ids.long()
        return cls(ids, torch.ones_like(ids, dtype=torch.bool))

    @property
    def scored(self) -> torch.Tensor:
        return self.mask[:, 1:]

    @property
    def tokens(self) -> int:
        return int(self.scored.sum())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, start: int, end: int) -> Windows:
        return Windows(self.ids[start:end], self.mask[start:end])


def split_stream(ids: torch.Tensor, window: int, dev: float = 0.1, test: float = 0.1
                 ) -> tuple[Windows, Windows, Windows]:
    """A 1-D token stream split in order into training text (the first 1 − ``dev`` − ``test``,
    one row) and development and test windows of ``window`` tokens."""
    ids = ids.reshape(-1).long()
    n = ids.numel()
    dev_start, test_start = int(n * (1 - test - dev)), int(n * (1 - test))
    parts = []
    for chunk in (ids[dev_start:test_start], ids[test_start:]):
        count = chunk.numel() // window
        if count == 0:
            raise ValueError(f"the text has {n:,} tokens: too few for windows of {window} tokens in its "
                             f"{dev:.0%} development and {test:.0%} test parts; give more text or a smaller "
                             "--window")
        parts.append(Windows.of(chunk[: count * window].view(count, window)))
    return Windows.of(ids[:dev_start]), parts[0], parts[1]


@torch.no_grad()
def sampling_rate(model, tokenizer, batch: int = 64, steps: int = 8) -> float:
    """Seconds per sampled token here: ``steps`` tokens generated for a batch of ``batch``, timed
    (generation is latency-bound, so FLOPs would underestimate it)."""
    start_ids = [int(i) for i in tokenizer("")["input_ids"]] or [0]
    prompt = torch.tensor(start_ids).expand(batch, -1).contiguous()
    begin = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=steps,
                   min_new_tokens=steps, pad_token_id=0)
    return (time.perf_counter() - begin) / (batch * steps)


@torch.no_grad()
def sample_texts(model, count: int, length: int, start: Sequence[int], end: int | None, pad: int = 0,
                 seed: int = 0, batch: int = 64, progress: bool = True) -> Windows:
    """``count`` texts sampled from the model itself (temperature 1, no truncation of the
    distribution), each beginning with the ``start`` ids (its BOS) and ending at the ``end``
    token or after ``length`` tokens, right-padded with ``pad``."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    head = torch.tensor(list(start), dtype=torch.long)
    rows, masks = [], []
    for done in tqdm(range(0, count, batch), desc="sampling", disable=not progress, leave=False):
        size = min(batch, count - done)
        prompt = head.expand(size, -1).contiguous()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=length - prompt.shape[1],
                             eos_token_id=end, pad_token_id=pad)
        real = torch.ones_like(out, dtype=torch.bool)
        if end is not None:  # everything after the first end token is padding
            ended = (out == end).long().cumsum(1)
            real = (ended == 0) | ((ended == 1) & (out == end))
        padded = torch.full((size, length), pad, dtype=torch.long)
        mask = torch.zeros(size, length, dtype=torch.bool)
        padded[:, :out.shape[1]], mask[:, :out.shape[1]] = out.where(real, pad), real
        rows.append(padded)
        masks.append(mask)
    return Windows(torch.cat(rows), torch.cat(masks))


# ---------------------------------------------------------------------- count-based baselines
@dataclass
class CountLM:
    """A count-based LM of training text: add-one unigram, and the bigram interpolated with it
    (Jelinek–Mercer; ``bigram_weight`` fitted on a development split; an unseen context backs
    off to the unigram)."""

    unigram: torch.Tensor
    bigram_counts: torch.Tensor
    bigram_weight: float = 0.9

    @classmethod
    def train(cls, text: Windows, vocab: int) -> CountLM:
        ids = text.ids
        tokens = ids[text.mask]
        unigram = (torch.bincount(tokens, minlength=vocab).double() + 1) / (tokens.numel() + vocab)
        pairs = (ids[:, :-1] * vocab + ids[:, 1:])[text.scored]
        counts = torch.bincount(pairs, minlength=vocab * vocab).view(vocab, vocab).double()
        return cls(unigram, counts)

    def parts(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        prev, nxt = windows[:, :-1].long(), windows[:, 1:].long()
        totals = self.bigram_counts.sum(-1)
        bigram = self.bigram_counts[prev, nxt] / totals[prev].clamp_min(1)
        return {"unigram": self.unigram[nxt], "bigram": bigram, "seen": totals[prev] > 0}

    def bigram_probs(self, parts: dict[str, torch.Tensor], weight: float | None = None) -> torch.Tensor:
        w = self.bigram_weight if weight is None else weight
        w = torch.where(parts["seen"], torch.tensor(float(w), dtype=torch.double), 0.0)
        return w * parts["bigram"] + (1 - w) * parts["unigram"]

    def fit(self, dev: Windows, step: float = WEIGHT_STEP) -> float:
        parts = self.parts(dev.ids)
        grid = [round(i * step, 6) for i in range(round(1 / step))]
        self.bigram_weight = max(
            grid, key=lambda w: float(self.bigram_probs(parts, w)[dev.scored].log().sum()))
        return self.bigram_weight


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def model_log_probs(model, windows: Windows, batch: int = 32) -> torch.Tensor:
    """log p(x_t | x_<t) of the model itself at positions 1.. of every window, [n, L − 1]."""
    out = []
    for start in range(0, len(windows), batch):
        part = windows.rows(start, start + batch)
        logits = model(input_ids=part.ids, attention_mask=part.mask.long()).logits.double().log_softmax(-1)
        out.append(logits[:, :-1].gather(-1, part.ids[:, 1:, None])[..., 0])
    return torch.cat(out)


def perplexity(probs_or_logs: torch.Tensor, windows: Windows, logs: bool = False) -> float:
    """exp of the mean negative log-probability over the scored tokens."""
    values = probs_or_logs if logs else probs_or_logs.clamp_min(1e-300).log()
    return float(math.exp(-values.double()[windows.scored].mean()))


def perplexities(sketch: SketchLM, counts: CountLM, windows: Windows, model=None) -> dict[str, float]:
    """Perplexity of every LM on the same tokens of the test ``windows``."""
    parts = sketch.parts(windows.ids)
    l3, l2, l1 = sketch.weights
    out = {}
    if model is not None:
        out["transformer (full context)"] = perplexity(model_log_probs(model, windows), windows, logs=True)
    if sketch.has_trigram:
        out["jet sketch: trigram + bigram + unigram"] = perplexity(sketch.mix(parts), windows)
    out["jet sketch: bigram + unigram"] = perplexity(sketch.mix(parts, (0.0, l2 + l3, l1)), windows)
    out["jet bigram read-out alone"] = perplexity(parts["bigram"], windows)
    out["jet unigram read-out alone"] = perplexity(parts["unigram"], windows)
    count_parts = counts.parts(windows.ids)
    out["count bigram LM (interpolated)"] = perplexity(counts.bigram_probs(count_parts), windows)
    out["count unigram LM"] = perplexity(count_parts["unigram"], windows)
    out["uniform"] = float(sketch.vocab)
    return out


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


def model_context(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def text_windows(model, tokenizer, text: str | None, samples: int, length: int, seed: int,
                 progress: bool) -> tuple[Windows, Windows, Windows, dict]:
    """Training text, development and test windows: the given ``text`` (tokenised, split in
    order 80/10/10) or ``samples`` texts sampled from the model itself (split 80/10/10 by text)."""
    context = model_context(model)
    if context is not None and length > context:
        raise ValueError(f"--length {length} is longer than the model's context of {context} tokens")
    if text is not None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        train, dev, test = split_stream(ids, length)
        return train, dev, test, {"source": "given text", "tokens": int(ids.numel()), "window": length}
    start = [int(i) for i in tokenizer("")["input_ids"]] or [int(i) for i in tokenizer("\n")["input_ids"]]
    if not start:
        raise ValueError("the tokenizer adds no BOS and has no line break to start samples from: give --text")
    end = getattr(tokenizer, "eos_token_id", None)
    pad = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    windows = sample_texts(model, samples, length, start, end, pad=pad, seed=seed, progress=progress)
    cut_dev, cut_test = int(0.8 * samples), int(0.9 * samples)
    if cut_dev == 0 or cut_test == cut_dev or cut_test == samples:
        raise ValueError(f"--samples {samples} is too few to split 80/10/10: give at least 10")
    data = {"source": "sampled from the model itself (temperature 1, from its BOS, stopping at its "
                      "end-of-text token)", "texts": samples, "max_length": length, "seed": seed,
            "tokens": windows.tokens}
    return windows.rows(0, cut_dev), windows.rows(cut_dev, cut_test), windows.rows(cut_test, samples), data


def sketch_model(model, tokenizer, prog: ResidualProgram, *, text: str | None = None, samples: int = 1024,
                 length: int = 256, first_tokens: int = DEFAULT_FIRST_TOKENS, trigram: str = "auto",
                 top: int = 16, max_seconds: float | None = 900.0, seed: int = 0,
                 out: str | Path | None = None, progress: bool = True, on_plan=None) -> SketchReport:
    """Read the sketch LM's tables from ``prog`` (the captured ``model``), fit its weights on a
    development split and measure every LM's perplexity on the test split. ``on_plan(plan)`` is
    called before any table is read (the CLI prints it there, and stops for a dry run by
    raising). With ``out``, the tables, ``sketch.json`` and ``perplexities.csv`` are written
    there (the trigram sweep checkpoints to ``out/trigram.ckpt`` and resumes from it)."""
    sampled = 0 if text is not None else samples * length
    rate = sampling_rate(model, tokenizer) if sampled else 0.0
    plan = plan_sketch(prog, first_tokens, trigram, top, max_seconds, sampled_tokens=sampled,
                       seconds_per_sampled_token=rate)
    if on_plan is not None:
        on_plan(plan)
    train, dev, test, data = text_windows(model, tokenizer, text, samples, length, seed, progress)
    resume = Path(out) / "trigram.ckpt" if out is not None and plan.trigram else None
    lm = read_sketch(prog, first_tokens, plan, top=top, progress=progress, resume=resume)
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
        meta = {"first_tokens_text": decoded, "data": data, "perplexities": scores}
        report.files.append(lm.save(folder, meta))
        report.files.append(folder / META_FILE)
        rows = "lm,perplexity\n" + "".join(f"\"{name}\",{value:.6g}\n" for name, value in scores.items())
        report.files.append(atomic_write(folder / "perplexities.csv", rows))
        if resume is not None and resume.exists():
            resume.unlink()
    return report
