"""Fitted lenses: one map per stream state, learned once on a corpus and applied to any input.

``kind="averaged_jacobian"``: ``Dec(J̄_s · h_s)`` (:mod:`.jacobian`); ``kind="tuned"``:
``Dec(h_s + A_s h_s + b_s)``, an affine translator per state (:mod:`.tuned`). Both read h_s[t]
only. A fitted lens is saved as a folder (``result.json`` beside ``tensors.safetensors``,
:func:`jetgraph.applications.saving.save_result`) with the corpus it was fitted on recorded: how
many prompts and tokens, a digest of their ids, and what the text is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.lens.results import LensResult
from jetgraph.applications.saving import load_result, save_result
from jetgraph.ir import ENCODER_NAME, ResidualProgram

FITTED_KINDS = ("averaged_jacobian", "tuned")


@dataclass
class Corpus:
    """What a lens was fitted on: ``prompts`` and ``tokens`` counted, ``positions`` the
    positions the fit averaged over, ``digest`` a SHA-256 of every prompt's ids (two fits on the
    same token ids have the same digest), ``description`` what the text is."""

    prompts: int
    tokens: int
    positions: int
    digest: str
    description: str = ""
    skip_first: int = 0

    @classmethod
    def of(cls, prompts: Sequence[torch.Tensor], description: str, positions: int,
           skip_first: int = 0) -> Corpus:
        digest = hashlib.sha256()
        for ids in prompts:
            digest.update(ids.reshape(-1).to(torch.int64).cpu().numpy().tobytes())
            digest.update(b"|")
        return cls(len(prompts), sum(int(p.numel()) for p in prompts), positions, digest.hexdigest(),
                   description, skip_first)


@dataclass
class FittedLens:
    """One fitted map per state (``labels``: ``h0``, ``h1``, …, of the view ``granularity``).

    ``matrices`` [states, d, d]: J̄_s (averaged Jacobian) or A_s (tuned: the translator is
    h + A_s h + b_s); ``biases`` [states, d] (tuned) or None. ``fit`` records how it was fitted
    (method, steps, losses, seconds)."""

    kind: str
    labels: list[str]
    matrices: torch.Tensor
    biases: torch.Tensor | None
    corpus: Corpus
    fit: dict = field(default_factory=dict)
    granularity: str = "block"
    d_model: int = 0

    @property
    def states(self) -> list[int]:
        return [int(label[1:]) for label in self.labels]

    def transform(self, row: int, h: torch.Tensor) -> torch.Tensor:
        """The state ``h`` [..., d] as state ``labels[row]``'s map sends it to the decoder."""
        matrix = self.matrices[row].to(h)  # the state's dtype and device
        if self.kind == "averaged_jacobian":
            return h @ matrix.T
        return h + h @ matrix.T + self.biases[row].to(h)  # type: ignore[index]

    @torch.no_grad()
    def apply(self, prog: ResidualProgram, input_ids: torch.Tensor, k: int = 5, *,
              attention_mask: torch.Tensor | None = None) -> LensResult:
        """This lens on ``input_ids``: one :class:`LensResult` with a centre per fitted state."""
        view = prog.at(self.granularity)  # type: ignore[arg-type]
        if view.d_model != self.d_model or max(self.states) >= len(view.units):
            raise ValueError(f"this {self.kind} lens was fitted on a model with d_model {self.d_model} "
                             f"and states {self.labels[0]}..{self.labels[-1]} at {self.granularity} "
                             f"granularity; the program has d_model {view.d_model} and "
                             f"{len(view.units) + 1} states")
        ids, mask = view.inputs(input_ids, attention_mask)
        states, side = view.stream_with_side_inputs(ids, mask)
        logits = torch.stack([view.decoder(self.transform(row, states[s]), side)
                              for row, s in enumerate(self.states)])
        written = [ENCODER_NAME if s == 0 else view.units[s - 1].name for s in self.states]
        return LensResult(self.kind, 0, list(self.labels), logits, view.decoder(states[-1], side), k,  # type: ignore[arg-type]
                          written_by=written, attention_mask=attention_mask)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the lens to ``folder`` (safetensors + JSON, the corpus recorded)."""
        return save_result(self, folder, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path) -> FittedLens:
        """A lens written by :meth:`save`."""
        lens = load_result(folder)
        if not isinstance(lens, cls):
            raise ValueError(f"{folder} holds a saved {type(lens).__name__}, not a fitted lens")
        return lens
