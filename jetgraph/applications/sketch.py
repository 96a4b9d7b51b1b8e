"""A jet n-gram language model: an interpolated n-gram LM built only from read-outs of a model.

The paper calls reading n-gram tables off the weights "sketching" the model; this makes it
quantitative. Three data-free tables are read from a captured model:

- **bigram**: the default read-out (:mod:`jetgraph.applications.ngrams.readout`), the model's own
  next-token distribution after each token, averaged over the first tokens it expects; each row
  kept sparse, as its top ``bigram_top`` tokens (:class:`SparseRows`), the rest of its mass
  backing off to the unigram;
- **trigram** (when affordable): the model's prediction for every token pair (a, b), kept as each
  row's top ``top`` tokens; the rest of a row's mass backs off to the bigram;
- **unigram**: the exact bigram rows averaged (what follows a token drawn uniformly), so no
  corpus enters the tables. (The table's stationary distribution, π = π B, scored worse: on
  TinyStories-656K the sketch's perplexity was 608 with it against 598.)

The sparse rows and their back-offs, with q_b the exact read-out row of b, I_b its top K tokens,
u the unigram, t_ab the exact pair row and T_ab its top tokens:

    p₂(c | b)    = q_b(c)                                      if c ∈ I_b
                 = r_b · u(c) / Σ_{j ∉ I_b} u(j),               r_b = 1 − Σ_{j ∈ I_b} q_b(j), otherwise
    p₃(c | a, b) = t_ab(c)                                     if c ∈ T_ab
                 = r_ab · p₂(c | b) / Σ_{j ∉ T_ab} p₂(j | b),   r_ab = 1 − Σ_{j ∈ T_ab} t_ab(j), otherwise

so kept probabilities are exact and every row sums to 1; K = V is the dense table. Memory is
O(V·K) (O(V²·K) with the trigram), and rows are read in chunks.

p(c | a, b) = λ₃ p₃(c | a, b) + λ₂ p₂(c | b) + λ₁ p₁(c), each part normalised, so the mixture is
a distribution. The λ are the only numbers fitted to text: on a development split, never on the
text the perplexities are measured on. :func:`perplexities` compares the sketch with the model
itself, with count-based bigram and unigram LMs trained on the same text, and with the sketch's
parts alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, RowReader
from jetgraph.capture.config_facts import context_length
from jetgraph.capture.shared import streamed_forward
from jetgraph.cost import Plan, available_memory, gemm_rate
from jetgraph.errors import CostError
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram

WEIGHT_STEP = 0.05
PLAN_ROWS = 1024
DEFAULT_BIGRAM_TOP = 128
TRIGRAM_MAX_BYTES = 2e9
CHECKPOINT_SECONDS = 60.0
LOOKUP_ENTRIES = 1 << 22  # sparse look-ups per batch while scoring: [tokens, K] at a time
LOGIT_ENTRIES = 1 << 24  # logits per batch of the model's own perplexity
TABLES_FILE = "sketch.safetensors"
META_FILE = "sketch.json"


@dataclass
class SparseRows:
    """Next-token distributions kept sparse: row r's ``top`` most probable tokens ``index`` [R, K]
    (ascending ids, int32) and their exact probabilities ``prob`` [R, K]. The rest of each row,
    1 − Σ prob, is for a back-off to spread (see the module docstring)."""

    index: torch.Tensor
    prob: torch.Tensor

    @classmethod
    def dense(cls, probs: torch.Tensor) -> SparseRows:
        """A dense [R, V] table as rows keeping every token (K = V)."""
        index = torch.arange(probs.shape[1], dtype=torch.int32).expand(probs.shape[0], -1).contiguous()
        return cls(index, probs)

    @property
    def top(self) -> int:
        return int(self.index.shape[1])

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.prob.nbytes

    def rest(self, rows: torch.Tensor) -> torch.Tensor:
        """1 − Σ kept probability of ``rows`` (float64; never below 0)."""
        return (1 - self.prob[rows].double().sum(-1)).clamp_min(0)

    def find(self, rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each of ``tokens`` [n, m] is kept in its row of ``rows`` [n], and its kept
        probability (float64; 0 where not kept)."""
        index = self.index[rows].long()
        pos = torch.searchsorted(index, tokens.contiguous()).clamp_max(self.top - 1)
        hit = index.gather(1, pos) == tokens
        return hit, torch.where(hit, self.prob[rows].double().gather(1, pos), 0.0)


@dataclass
class SketchLM:
    """The tables and interpolation weights of a jet n-gram LM over a vocabulary of ``vocab``.

    ``unigram`` [V] holds probabilities (float64); ``bigram`` the sparse rows of every token
    (float64 probabilities), ``trigram`` those of every pair, row a·V + b (float32; None
    without a trigram); ``weights`` are (λ₃, λ₂, λ₁); ``first_tokens`` the tokens the bigram
    read-out was averaged over."""

    unigram: torch.Tensor
    bigram: SparseRows
    trigram: SparseRows | None = None
    weights: tuple[float, float, float] = (0.0, 0.9, 0.1)
    first_tokens: list[int] = field(default_factory=list)
    _scale: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def vocab(self) -> int:
        return int(self.unigram.shape[0])

    @property
    def has_trigram(self) -> bool:
        return self.trigram is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the tables held: O(V·K), O(V²·K) with the trigram."""
        return self.unigram.nbytes + self.bigram.nbytes + (self.trigram.nbytes if self.has_trigram else 0)

    # ------------------------------------------------------------------ probabilities
    def parts(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """p₁, p₂, p₃ of every token of ``windows`` [n, L] from position 1 on, each [n, L − 1]
        (float64); p₃ at position 1, which has no token two back, is p₂."""
        windows = windows.long()
        prev, nxt = windows[:, :-1], windows[:, 1:]
        p1 = self.unigram.double()[nxt]
        p2 = self.bigram_probs(prev, nxt)
        p3 = p2.clone()
        if self.has_trigram and windows.shape[1] > 2:
            p3[:, 1:] = self.trigram_probs(windows[:, :-2], windows[:, 1:-1], windows[:, 2:])
        return {"unigram": p1, "bigram": p2, "trigram": p3}

    def bigram_probs(self, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p₂(c | b) for tokens ``b`` and ``c`` of one shape (float64): the kept probability, or
        the row's rest spread by the unigram over the tokens it does not keep."""
        flat_b, flat_c = b.reshape(-1).long(), c.reshape(-1, 1).long()
        step = max(1, LOOKUP_ENTRIES // self.bigram.top)
        out = [self._bigram(flat_b[i:i + step], flat_c[i:i + step])[:, 0]
               for i in range(0, len(flat_b), step)]
        return (torch.cat(out) if out else torch.zeros(0, dtype=torch.double)).view(c.shape)

    def trigram_probs(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p₃(c | a, b) for tokens of one shape (float64): the kept probability when c is among row
        (a, b)'s top tokens, else the row's rest spread over the other tokens by p₂(· | b)."""
        flat = [t.reshape(-1).long() for t in (a, b, c)]
        step = max(1, LOOKUP_ENTRIES // (self.trigram.top + self.bigram.top))
        out = [self._trigram(*(t[i:i + step] for t in flat)) for i in range(0, len(flat[0]), step)]
        return (torch.cat(out) if out else torch.zeros(0, dtype=torch.double)).view(c.shape)

    def _bigram(self, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p₂(c | b) for rows ``b`` [n] and tokens ``c`` [n, m]."""
        hit, kept = self.bigram.find(b, c)
        return torch.where(hit, kept, self._backoff_scale()[b, None] * self.unigram.double()[c])

    def _trigram(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p₃(c | a, b) for [n] tokens each."""
        rows = a * self.vocab + b
        hit, kept = self.trigram.find(rows, c[:, None])
        covered = self._bigram(b, self.trigram.index[rows].long()).sum(-1)
        rest = self.trigram.rest(rows) * self._bigram(b, c[:, None])[:, 0] / (1 - covered).clamp_min(1e-12)
        return torch.where(hit[:, 0], kept[:, 0], rest)

    def _backoff_scale(self) -> torch.Tensor:
        """r_b / Σ_{j ∉ I_b} u(j) of every row b [V] (0 for a row that keeps every token)."""
        if self._scale is None:
            unigram = self.unigram.double()
            rows = torch.arange(self.vocab)
            left = unigram.sum() - unigram[self.bigram.index.long()].sum(-1)
            scale = self.bigram.rest(rows) / left.clamp_min(1e-300)
            keeps_all = self.bigram.top >= self.vocab
            self._scale = torch.zeros_like(scale) if keeps_all else torch.where(left > 0, scale, 0.0)
        return self._scale

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
        tail = torch.tensor(history[-2:]).expand(self.vocab, -1)
        windows = torch.cat([tail, torch.arange(self.vocab)[:, None]], 1)
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
        tensors = {"unigram": self.unigram.double().contiguous(),
                   "bigram_index": self.bigram.index.int().contiguous(),
                   "bigram_prob": self.bigram.prob.double().contiguous()}
        if self.has_trigram:
            tensors["trigram_index"] = self.trigram.index.int().contiguous()
            tensors["trigram_prob"] = self.trigram.prob.float().contiguous()
        atomic_write(folder / TABLES_FILE, lambda temporary: save_file(tensors, temporary))
        info = {"weights": list(self.weights), "first_tokens": self.first_tokens, "vocab": self.vocab,
                "bigram_top": self.bigram.top, "trigram_top": self.trigram.top if self.has_trigram else 0
                } | (meta or {})
        atomic_write(folder / META_FILE, json.dumps(info, indent=1, ensure_ascii=False) + "\n")
        return folder / TABLES_FILE

    @classmethod
    def load(cls, folder: str | Path) -> SketchLM:
        """A saved sketch (a dense ``bigram`` table of earlier files is read as K = V)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        tensors = load_file(str(folder / TABLES_FILE))
        info = json.loads((folder / META_FILE).read_text())
        bigram = (SparseRows.dense(tensors["bigram"]) if "bigram" in tensors
                  else SparseRows(tensors["bigram_index"], tensors["bigram_prob"]))
        trigram = (SparseRows(tensors["trigram_index"], tensors["trigram_prob"]) if "trigram_index" in tensors
                   else None)
        return cls(tensors["unigram"], bigram, trigram, tuple(info["weights"]), list(info["first_tokens"]))


# ---------------------------------------------------------------------- the read-out
# The only calls into jetgraph.applications.ngrams (readout, convention): the tables, the plan's
# timing and the reads it counts all go through these, so the read-out's input convention
# reaches every one of them.
Convention = object  # an InputConvention, a sequence of prefix ids, or None (the tokenizer's)


def _reader(prog: ResidualProgram, count: int | None, convention: Convention, chunk: int) -> RowReader:
    """The read-out the tables are made of: the model after each context, read after the
    convention's prefix and mixed over ``count`` first tokens it expects (None: the read-out's
    default; 0: the context alone, as for the trigram's pairs and the plan's timing)."""
    return RowReader(prog, DEFAULT_READOUT, count, convention=convention, chunk=chunk)


def _reads_per_row(vocab: int, count: int | None, convention: Convention) -> tuple[int, bool]:
    """Model reads per row of the read-out, and whether it mixes over expected first tokens
    (which are found by a pass of its own first); both known without computing anything."""
    from jetgraph.applications.ngrams.convention import input_convention
    from jetgraph.applications.ngrams.readout import placeholder_prefixes

    resolved = input_convention(convention, None, vocab)
    prefixes = placeholder_prefixes(vocab, resolved, count)
    if prefixes is None:
        return 1, False
    return len(prefixes), prefixes.length > len(resolved.prefix)


def _convention(convention: Convention, tokenizer: object) -> Convention:
    """``convention`` as given, else the tokenizer's (the tokens it puts before a text)."""
    from jetgraph.applications.ngrams.convention import input_convention

    return input_convention(convention, tokenizer)


# ---------------------------------------------------------------------- reading the tables


@dataclass(frozen=True)
class SketchPlan:
    """What reading the tables costs, as upper bounds at the rate measured here: seconds of each
    table (every read charged as a full pair row with its top-k selection), the tables' bytes,
    and ``peak_bytes``: the largest of the phases' peaks (:meth:`phases`), above the loaded
    model. ``trigram`` says whether it is read."""

    vocab: int
    bigram_top: int
    bigram_seconds: float
    bigram_bytes: int
    trigram_rows: int
    trigram_top: int
    trigram_seconds: float
    trigram_bytes: int
    trigram: bool
    peak_bytes: float
    reason: str = ""
    sampled_tokens: int = 0
    sampling_seconds: float = 0.0
    scored_tokens: int = 0
    scoring_seconds: float = 0.0
    chunk_bytes: float = 0.0  # working memory of reading one chunk of rows
    sampling_bytes: float = 0.0  # of sampling the text
    scoring_bytes: float = 0.0  # of scoring the test text
    reads: int = 0  # model reads of the bigram table (rows × prefixes, and the first tokens' pass)
    row_flops: float = 0.0  # matmul FLOPs of one row read
    token_flops: float = 0.0  # of one token through the model (sampling, scoring)
    gemm_rate: float = 1.0

    @property
    def seconds(self) -> float:
        return (self.bigram_seconds + self.sampling_seconds + self.scoring_seconds
                + (self.trigram_seconds if self.trigram else 0.0))

    @property
    def tables_bytes(self) -> float:
        return self.bigram_bytes + (self.trigram_bytes if self.trigram else 0)

    def phases(self) -> list[Plan]:
        """The run as :class:`jetgraph.cost.Plan` phases, one after another, for
        :func:`jetgraph.cost.format_plan` and :func:`jetgraph.cost.check_plan`: sampling the
        text (when sampled), the bigram table, the trigram table (when read), then fitting the
        weights, scoring the test text and writing the tables. Each phase's peak counts the
        tables read before it; writing holds a serialised copy of the tables."""
        from jetgraph.cost import format_count

        out = []
        if self.sampled_tokens:
            out.append(Plan(f"sampling the text (up to {format_count(self.sampled_tokens)} tokens)",
                            self.sampled_tokens, "sampled tokens", self.sampled_tokens * self.token_flops,
                            self.sampling_bytes, self.sampling_seconds, self.gemm_rate))
        bigram = f"bigram table, {format_count(self.vocab)} tokens × top {self.bigram_top}"
        out.append(Plan(bigram, self.reads, "row reads", self.reads * self.row_flops,
                        self.bigram_bytes + self.chunk_bytes, self.bigram_seconds, self.gemm_rate))
        if self.trigram:
            trigram = f"trigram table, {format_count(self.trigram_rows)} pairs × top {self.trigram_top}"
            out.append(Plan(trigram, self.trigram_rows, "pair rows", self.trigram_rows * self.row_flops,
                            self.tables_bytes + self.chunk_bytes, self.trigram_seconds, self.gemm_rate))
        out.append(Plan(f"fitting, scoring up to {format_count(self.scored_tokens)} test tokens, writing",
                        self.scored_tokens, "test tokens", self.scored_tokens * self.token_flops,
                        self.tables_bytes + max(self.scoring_bytes, self.tables_bytes), self.scoring_seconds,
                        self.gemm_rate))
        return out

    def skipped(self) -> str:
        """A line for the printed plan when the trigram table is not read ("" when it is)."""
        from jetgraph.cost import format_bytes, format_count, format_duration

        if self.trigram:
            return ""
        return (f"  trigram table skipped: {self.reason} ({format_count(self.trigram_rows)} pairs × top "
                f"{self.trigram_top} would take ≈ {format_duration(self.trigram_seconds)} and "
                f"{format_bytes(self.trigram_bytes)})")

    def describe(self) -> str:
        from jetgraph.cost import format_bytes, format_count, format_duration

        tri = (f"trigram: {format_count(self.trigram_rows)} pairs × top {self.trigram_top}, "
               f"~{format_duration(self.trigram_seconds)}, {format_bytes(self.trigram_bytes)}"
               + ("" if self.trigram else f" - skipped: {self.reason}"))
        sampling = (f"sampling up to {format_count(self.sampled_tokens)} tokens from the model, at most "
                    f"~{format_duration(self.sampling_seconds)}; " if self.sampled_tokens else "")
        scoring = (f"; scoring up to {format_count(self.scored_tokens)} test tokens with the model, "
                   f"~{format_duration(self.scoring_seconds)}" if self.scored_tokens else "")
        return (f"{sampling}bigram: {format_count(self.vocab)} tokens × top {self.bigram_top}, "
                f"~{format_duration(self.bigram_seconds)}, {format_bytes(self.bigram_bytes)}; "
                f"{tri}{scoring}; "
                f"total ≤ ~{format_duration(self.seconds)}, peak memory ≤ {format_bytes(self.peak_bytes)} "
                "above the model")


def plan_sketch(prog: ResidualProgram, first_tokens: int | None = None, trigram: str = "auto",
                top: int = 16, max_seconds: float | None = 900.0, max_bytes: float = TRIGRAM_MAX_BYTES,
                sampled_tokens: int = 0, seconds_per_sampled_token: float = 0.0, *,
                bigram_top: int = DEFAULT_BIGRAM_TOP, chunk: int = 1024, sample_batch: int = 64,
                sample_length: int = 256, max_memory: float | None = None,
                convention: Convention = None, scored_tokens: int = 0) -> SketchPlan:
    """Cost the tables before computing any (two chunks of pairs read and reduced here), and the
    sampling of ``sampled_tokens`` at ``seconds_per_sampled_token`` (timed by
    :func:`sampling_rate`, in batches of ``sample_batch`` texts of ``sample_length``).
    ``trigram``: ``"auto"`` reads it when it fits ``max_seconds`` and ``max_bytes``, ``"on"``
    refuses (:class:`CostError`) when it does not, ``"off"`` never reads it. Everything together
    past ``max_seconds``, or a peak past ``max_memory`` (default: the memory available now), is
    refused, naming the option that lifts it. ``scored_tokens``: tokens of test text the model
    itself scores, each charged as a pair row. ``first_tokens`` and ``convention``: as for
    :func:`read_sketch`."""
    from jetgraph.cost import format_bytes

    if trigram not in ("auto", "on", "off"):
        raise ValueError(f"trigram must be 'auto', 'on' or 'off', got {trigram!r}")
    if bigram_top < 1 or top < 1:
        raise ValueError(f"tokens kept per row must be at least 1, got {min(bigram_top, top)}")
    vocab = int(prog.decoder.unembedding.shape[0])
    bigram_top, top = min(bigram_top, vocab), min(top, vocab)
    pair_rows = vocab * vocab
    reader = _reader(prog, 0, convention, chunk)
    per_row = _seconds_per_row(reader, top, min(pair_rows, 2 * min(reader.chunk, PLAN_ROWS)))
    reads, mixes = _reads_per_row(vocab, first_tokens, convention)
    bigram_seconds = per_row * vocab * (reads + mixes)  # finding the first tokens: at most V rows
    bigram_bytes = vocab * (bigram_top * 12 + 16)  # int32 ids, float64 probabilities; unigram, column sums
    seconds = per_row * pair_rows
    memory = pair_rows * top * 8  # int32 ids, float32 probabilities
    reason = ""
    if trigram == "off":
        reason = 'trigram="off"'
    elif max_seconds is not None and seconds > max_seconds:
        reason = f"estimated {seconds:,.0f} s, more than the {max_seconds:,.0f} s allowed"
    elif memory > max_bytes:
        reason = f"needs {memory / 1e9:.1f} GB, more than {max_bytes / 1e9:.1f} GB"
    if reason and trigram == "on":
        raise CostError(f"refusing the trigram table of {pair_rows:,} pairs: {reason}; use trigram=\"auto\" "
                        "or trigram=\"off\", or raise max_seconds")
    chunk_bytes = _chunk_bytes(prog, reader.chunk)
    sampling_bytes = _sampling_bytes(prog, sample_batch, sample_length) if sampled_tokens else 0.0
    scoring_bytes = _scoring_bytes(prog, bigram_top, top)
    row_flops, token_flops = _flops(prog, reader.first_tokens.length + 2 if reader.first_tokens else 2)
    plan = SketchPlan(vocab, bigram_top, bigram_seconds, bigram_bytes, pair_rows, top, seconds, memory,
                      not reason, 0.0, reason, sampled_tokens, sampled_tokens * seconds_per_sampled_token,
                      scored_tokens, scored_tokens * per_row, chunk_bytes, sampling_bytes, scoring_bytes,
                      vocab * (reads + mixes), row_flops, token_flops, gemm_rate())
    plan = dataclasses.replace(plan, peak_bytes=max(p.peak_bytes for p in plan.phases()))
    peak = plan.peak_bytes
    if max_seconds is not None and plan.seconds > max_seconds:
        raise CostError(f"refusing the sketch: {plan.describe()}; more than the {max_seconds:,.0f} s allowed "
                        "(fewer samples, fewer first_tokens, trigram=\"off\", or raise max_seconds)")
    limit = available_memory() if max_memory is None else max_memory
    if limit is not None and peak > limit:
        raise CostError(f"refusing the sketch: {plan.describe()}; more than the {format_bytes(limit)} of "
                        f"memory available (lower bigram_top from {bigram_top}, or trigram=\"off\")")
    return plan


@torch.no_grad()
def read_sketch(prog: ResidualProgram, first_tokens: int | None = None,
                plan: SketchPlan | None = None, top: int = 16, chunk: int = 1024, progress: bool = True,
                resume: str | Path | None = None, bigram_top: int = DEFAULT_BIGRAM_TOP,
                convention: Convention = None) -> SketchLM:
    """The tables of the sketch LM, read from ``prog`` in chunks of rows (the trigram only when
    ``plan`` says so): each bigram row's top tokens, each trigram row's, as many as ``plan``
    says (without a plan: ``bigram_top``, no trigram), and the unigram from the exact rows.
    ``convention``: the tokens put before every context (an ``InputConvention`` or ids; see
    :mod:`jetgraph.applications.ngrams.convention`); ``first_tokens``: how many tokens the model
    expects first each bigram row is mixed over (None: none after a prefix, 16 without one).
    ``resume``: a folder for the sweeps' checkpoints (``bigram.ckpt``, ``trigram.ckpt``; an
    interrupted run continues)."""
    plan = plan or plan_sketch(prog, first_tokens, "off", top, max_seconds=None, bigram_top=bigram_top,
                               chunk=chunk, max_memory=math.inf, convention=convention)
    vocab = int(prog.decoder.unembedding.shape[0])
    folder = Path(resume) if resume is not None else None
    reader = _reader(prog, first_tokens, convention, chunk)
    bigram, columns = _sweep(reader, lambda start, end: torch.arange(start, end)[:, None], vocab,
                             plan.bigram_top, torch.float64, columns=True, progress=progress,
                             desc="bigram rows", checkpoint=folder / "bigram.ckpt" if folder else None)
    unigram = columns / vocab  # every token equally likely as the context
    trigram = None
    if plan.trigram:
        pairs = _reader(prog, 0, convention, chunk)
        trigram, _ = _sweep(pairs, lambda start, end: _pair_contexts(vocab, start, end), vocab * vocab,
                            plan.trigram_top, torch.float32, columns=False, progress=progress,
                            desc="trigram pairs", checkpoint=folder / "trigram.ckpt" if folder else None)
    return SketchLM(unigram, bigram, trigram, (0.0, 0.9, 0.1), list(reader.first))


def _keep_top(log_probs: torch.Tensor, top: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``top`` most probable tokens (ascending ids, int32) and their probabilities."""
    values, index = log_probs.topk(top, -1)
    index, order = index.sort(-1)
    return index.int(), values.gather(-1, order).exp().to(dtype)


def _sweep(reader: Callable[[torch.Tensor], torch.Tensor], contexts: Callable[[int, int], torch.Tensor],
           rows: int, top: int, dtype: torch.dtype, *, columns: bool, progress: bool, desc: str,
           checkpoint: Path | None = None) -> tuple[SparseRows, torch.Tensor | None]:
    """Read ``rows`` contexts (``contexts(start, end)``) in the reader's chunks, keeping each row's
    top ``top`` tokens, and (``columns``) the sum of the exact rows. Memory: the kept rows and one
    chunk. ``checkpoint``: a file written at most every minute and when interrupted; a run
    with the same reader, rows and ``top`` continues from it."""
    from tqdm.auto import tqdm

    vocab = int(reader.vocab)
    top = min(top, vocab)
    key = {"rows": rows, "top": top, "vocab": vocab, "dtype": str(dtype), "reader": reader.describe()}
    state = _load_checkpoint(checkpoint, key)
    if state is None:
        state = {"key": key, "done": 0, "index": torch.zeros(rows, top, dtype=torch.int32),
                 "prob": torch.zeros(rows, top, dtype=dtype),
                 "columns": torch.zeros(vocab if columns else 0, dtype=torch.double)}
    step = int(reader.chunk)
    begun, saved = state["done"], time.monotonic()
    try:
        for start in tqdm(range(begun, rows, step), desc=desc, disable=not progress, leave=False):
            end = min(start + step, rows)
            log_probs = reader(contexts(start, end))
            state["index"][start:end], state["prob"][start:end] = _keep_top(log_probs, top, dtype)
            if columns:
                state["columns"] += log_probs.exp_().sum(0)  # in place: no second [chunk, V] tensor
            state["done"] = end
            if checkpoint is not None and time.monotonic() - saved > CHECKPOINT_SECONDS:
                _save_checkpoint(checkpoint, state)
                saved = time.monotonic()
    except BaseException:
        if checkpoint is not None and state["done"] > begun:
            _save_checkpoint(checkpoint, state)
        raise
    return SparseRows(state["index"], state["prob"]), state["columns"] if columns else None


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def _load_checkpoint(path: Path | None, key: dict) -> dict | None:
    """The sweep's saved state when ``path`` holds one for the same ``key``, else None."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # a damaged or foreign file: start over (it is overwritten)
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _seconds_per_row(reader: RowReader, top: int, rows: int) -> float:
    """Seconds per pair row, read and reduced to its top tokens, timed here on the second of two
    chunks (the first warms up), so the estimate is this machine's, under its present load."""
    vocab = int(reader.vocab)
    half = max(1, rows // 2)
    _keep_top(reader(_pair_contexts(vocab, 0, half)), min(top, vocab), torch.float64)
    start = time.perf_counter()
    log_probs = reader(_pair_contexts(vocab, half, max(rows, half + 1)))
    _keep_top(log_probs, min(top, vocab), torch.float64)
    log_probs.exp_().sum(0)
    return (time.perf_counter() - start) / max(1, rows - half)


def _dims(prog: ResidualProgram) -> tuple[int, int, int, int]:
    """Vocabulary, hidden width, residual units and the largest unit's parameters."""
    vocab, hidden = prog.decoder.unembedding.shape
    return int(vocab), int(hidden), len(prog.units), max((u.num_parameters for u in prog.units), default=0)


def _flops(prog: ResidualProgram, positions: int) -> tuple[float, float]:
    """Matmul FLOPs of one row read (every unit at ``positions`` tokens: the prefix, a first
    token and the context; the decoder at the last) and of one token through the model (every
    unit and the decoder)."""
    vocab, hidden, _, _ = _dims(prog)
    units = 2.0 * sum(u.num_parameters for u in prog.units)
    return units * positions + 2.0 * vocab * hidden, units + 2.0 * vocab * hidden


def _chunk_bytes(prog: ResidualProgram, rows: int, positions: int = 3) -> float:
    """Bound on the working memory of one chunk of ``rows`` contexts of up to ``positions``
    tokens (a BOS, a first token, the context): six float64 [rows, V] tensors (the read-out,
    its mixture, softmax, exp and top-k), float32 logits at every position, and activations of
    width unit parameters / hidden + 8·hidden, twice."""
    vocab, hidden, _, params = _dims(prog)
    return rows * vocab * (6 * 8 + positions * 4) + rows * positions * (params / hidden + 8 * hidden) * 4 * 2


def _sampling_bytes(prog: ResidualProgram, batch: int, length: int) -> float:
    """Bound on sampling's working memory: a key-value cache of hidden width per unit (twice, as
    the cache grows by copies) and a few float32 [batch, V] logits."""
    vocab, hidden, units, _ = _dims(prog)
    return 2 * units * batch * length * hidden * 4 * 2 + batch * vocab * 4 * 4


def _scoring_bytes(prog: ResidualProgram, bigram_top: int, trigram_top: int) -> float:
    """Bound on scoring's working memory: the model's own log-probabilities (float32 logits, two
    float64 copies of a batch of ``LOGIT_ENTRIES``), the sparse look-ups (ids, probabilities,
    positions and hits of ``LOOKUP_ENTRIES`` kept entries, three times for the trigram's), and
    the back-off scales."""
    vocab, *_ = _dims(prog)
    return max(LOGIT_ENTRIES * 20, LOOKUP_ENTRIES * 40 * 3) + vocab * bigram_top * 8


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
    off to the unigram). Only the pairs seen are stored (``pair_keys`` a·V + b, sorted, and their
    ``pair_counts``), so memory grows with the text, not with V²."""

    unigram: torch.Tensor
    pair_keys: torch.Tensor
    pair_counts: torch.Tensor
    context_totals: torch.Tensor
    bigram_weight: float = 0.9

    @property
    def vocab(self) -> int:
        return int(self.unigram.shape[0])

    @classmethod
    def train(cls, text: Windows, vocab: int) -> CountLM:
        ids = text.ids
        tokens = ids[text.mask]
        unigram = (torch.bincount(tokens, minlength=vocab).double() + 1) / (tokens.numel() + vocab)
        prev = ids[:, :-1][text.scored]
        keys, counts = torch.unique(prev * vocab + ids[:, 1:][text.scored], sorted=True, return_counts=True)
        return cls(unigram, keys, counts.double(), torch.bincount(prev, minlength=vocab).double())

    def parts(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        prev, nxt = windows[:, :-1].long(), windows[:, 1:].long()
        keys = prev * self.vocab + nxt
        count = torch.zeros(keys.shape, dtype=torch.double)
        if len(self.pair_keys):
            pos = torch.searchsorted(self.pair_keys, keys).clamp_max(len(self.pair_keys) - 1)
            count = torch.where(self.pair_keys[pos] == keys, self.pair_counts[pos], 0.0)
        totals = self.context_totals[prev]
        return {"unigram": self.unigram[nxt], "bigram": count / totals.clamp_min(1), "seen": totals > 0}

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
    """log p(x_t | x_<t) of the model itself at positions 1.. of every window, [n, L − 1], in
    batches of at most ``batch`` windows and ``LOGIT_ENTRIES`` logits."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    batch = max(1, min(batch, LOGIT_ENTRIES // max(1, windows.ids.shape[1] * vocab)))
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
    convention = _convention(convention, tokenizer)
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
