"""One path's rows on any batch of contexts, compiled once.

:class:`PathReader` is how every application reads a path outside a streamed table: the dense
tables (:func:`~jetgraph.applications.ngrams.sweep.full_table`), the default read-out's rows
(:class:`~jetgraph.applications.ngrams.readout.RowReader`), roles' path scores, the sketch, the
ground-truth study, diffs and masses. The path is parsed, bound and planned once
(spec → term → schedule), and each context length gets one evaluator with the sweep's
shortcuts (the decoder and trailing MLPs on the last position only, attention split by
position: :class:`~jetgraph.applications.ngrams.evaluator.PathEvaluator`), checked against the
plain schedule on the first batch it reads.

"Averaged over first tokens" has one meaning here, as in the tables: the next-token
*probabilities* mixed (:meth:`PathReader.logits`, :meth:`PathReader.log_probs`).
:meth:`PathReader.mean_logits` is the other, named for what it is: the logits averaged (roles'
path scores, which are additive in logit space).
"""

from __future__ import annotations

import torch

from jetgraph.applications.ngrams.evaluator import PathEvaluator
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.paths import context_tokens, path_term, starts_at_model_state, view_of_term
from jetgraph.passes.pathspec import PathSpec
from jetgraph.passes.terms import Term

PROBE_ROWS = 8  # rows of the first batch the shortcuts are checked on


class PathReader:
    """``reader.logits(contexts)``: [n, V] last-position logits of one path on contexts
    [n, length] (a 1-D tensor: one token each), on the CPU.

    ``first_tokens``: for a path from the model's stream (``h_last→U``), the token sequences read
    before each context and their weights (:class:`FirstTokens`); ``order``: the jets' order
    (default: the path's largest degree)."""

    def __init__(self, prog: ResidualProgram, path: str | PathSpec | Term,
                 first_tokens: FirstTokens | None = None, *, order: int | None = None) -> None:
        self.term = path_term(prog, path, order)
        self.view = view_of_term(prog, self.term)
        if self.view.decoder.unembedding is None:
            raise ValueError("the decoder has no affine readout: cannot size the vocabulary")
        self.vocab = int(self.view.decoder.unembedding.shape[0])
        self.whole_context = starts_at_model_state(self.term)
        self.length = None if self.whole_context else context_tokens(self.term)
        if first_tokens is not None:
            if not self.whole_context:
                raise ValueError("first_tokens applies to paths from the model's stream (h_last→U); "
                                 f"{self.term.name} reads exactly its own tokens")
            first_tokens.check_vocabulary(self.vocab)
        self.first_tokens = first_tokens
        self._evaluators: dict[int, PathEvaluator] = {}

    @property
    def name(self) -> str:
        return self.term.name

    def contexts(self, contexts: torch.Tensor) -> torch.Tensor:
        """``contexts`` checked: long [n, length] ids in the vocabulary, of the path's length."""
        ids = torch.as_tensor(contexts)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"contexts must be integer token ids, got {ids.dtype}")
        ids = ids.long().view(-1, 1) if ids.dim() == 1 else ids.long()
        if ids.dim() != 2 or ids.shape[1] < 1 or (self.length is not None and ids.shape[1] != self.length):
            wanted = f"[rows, {self.length}]" if self.length is not None else "[rows, length >= 1]"
            raise ValueError(f"{self.name} needs contexts of shape {wanted}, got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"context token ids must lie in [0, {self.vocab})")
        return ids

    def evaluator(self, length: int) -> PathEvaluator:
        """The path's evaluator on contexts of ``length`` tokens (built and checked once)."""
        if length not in self._evaluators:
            self._evaluators[length] = PathEvaluator(self.view, self.term, length, None, self.vocab)
        return self._evaluators[length]

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        evaluator = self.evaluator(ids.shape[1])
        if not getattr(evaluator, "verified", False):
            evaluator.verify(ids[:PROBE_ROWS])
            evaluator.verified = True  # type: ignore[attr-defined]
        with self.view.resident([u for u in self.term.units() if isinstance(u, ResidualUnit)]):
            return evaluator(ids).cpu()

    def _after(self, ids: torch.Tensor, sequence: tuple[int, ...]) -> torch.Tensor:
        head = torch.tensor(sequence, dtype=torch.long).expand(len(ids), -1)
        return torch.cat([head, ids], 1)

    @torch.no_grad()
    def logits(self, contexts: torch.Tensor) -> torch.Tensor:
        """[n, V] logits: the path's own (after the one first-token sequence, if given), or with
        several first tokens the log of their probability mixture (so a softmax gives the mixed
        distribution, as in the tables), float32 then."""
        ids = self.contexts(contexts)
        if self.first_tokens is None:
            return self._run(ids)
        if len(self.first_tokens) == 1:
            return self._run(self._after(ids, self.first_tokens.ids[0])).float()
        return self.log_probs(ids).float()

    @torch.no_grad()
    def log_probs(self, contexts: torch.Tensor) -> torch.Tensor:
        """[n, V] float64 log p(next token | context): the path's distribution, mixed over the
        first tokens when there are several."""
        ids = self.contexts(contexts)
        if self.first_tokens is None:
            return self._run(ids).double().log_softmax(-1)
        if len(self.first_tokens) == 1:
            return self._run(self._after(ids, self.first_tokens.ids[0])).double().log_softmax(-1)
        total = torch.zeros(len(ids), self.vocab, dtype=torch.double)
        for sequence, weight in zip(self.first_tokens.ids, self.first_tokens.weights, strict=True):
            total += weight * self._run(self._after(ids, sequence)).double().softmax(-1)
        return total.log()

    @torch.no_grad()
    def mean_logits(self, contexts: torch.Tensor) -> torch.Tensor:
        """[n, V] float64 logits averaged over the first tokens with their weights (not a
        probability mixture: roles' scores add in logit space); the path's own without them."""
        ids = self.contexts(contexts)
        if self.first_tokens is None:
            return self._run(ids).double()
        total = torch.zeros(len(ids), self.vocab, dtype=torch.double)
        for sequence, weight in zip(self.first_tokens.ids, self.first_tokens.weights, strict=True):
            total += weight * self._run(self._after(ids, sequence)).double()
        return total


def path_reader(prog: ResidualProgram, path: str | PathSpec, first_tokens: FirstTokens | None = None
                ) -> PathReader:
    """The reader of ``path`` on ``prog``, made once per program (in ``prog.memo``: it lives and
    dies with the program, which a reader refers to)."""
    readers = prog.memo.setdefault("path readers", {})
    key = (path.name if isinstance(path, PathSpec) else path, first_tokens)
    if key not in readers:
        readers[key] = PathReader(prog, path, first_tokens)
    return readers[key]
