"""The jet n-gram LM itself: sparse bigram rows, the trigram's pair rows and the unigram,
interpolated (:class:`SketchLM`), and saved or loaded as safetensors and JSON."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.sketch.text import Windows
from jetgraph.files import atomic_write

WEIGHT_STEP = 0.05
LOOKUP_ENTRIES = 1 << 22  # sparse look-ups per batch while scoring: [tokens, K] at a time
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
