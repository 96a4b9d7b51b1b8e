"""Training dynamics: how a bigram read-out's top-k table forms over a series of checkpoints.

For every checkpoint t, with TopK_t its k most probable (context, next) entries (ranked by
p_t(next | context) over the source tokens):

- **hit ratio** |TopK_t ∩ TopK_final| / k: how much of the final table is already there;
- **top-k mass** Σ_{(a, b) ∈ TopK_t} p_t(b | a): the total conditional probability of the
  checkpoint's own top-k (at most k);
- **mass on the final top-k** Σ_{(a, b) ∈ TopK_final} p_t(b | a): what checkpoint t already
  gives the entries the final model ends with.

The last checkpoint given is the final one.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, RowReader
from jetgraph.capture import capture
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram


@dataclass
class CheckpointCurves:
    """One row per checkpoint: label, step, hit_ratio, top_k_mass, final_top_k_mass."""

    readout: str
    k: int
    rows: list[dict]

    def write_csv(self, path: str | Path) -> Path:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        return atomic_write(path, buffer.getvalue())

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        from jetgraph.applications.plots import plot_curves

        steps = [r["step"] for r in self.rows]
        series = {"hit ratio w.r.t. the final top-k": [r["hit_ratio"] for r in self.rows],
                  f"top-{self.k} mass ÷ {self.k}": [r["top_k_mass"] / self.k for r in self.rows],
                  f"mass on the final top-{self.k} ÷ {self.k}":
                      [r["final_top_k_mass"] / self.k for r in self.rows]}
        return plot_curves(steps, series, path, "checkpoint (training step)", "ratio",
                           title or f"{self.readout}: top-{self.k} table over checkpoints")

    def table(self) -> str:
        lines = [f"{self.readout}, top-{self.k} entries",
                 f"  {'checkpoint':28s} {'step':>8s} {'hit ratio':>10s} {'top-k mass':>11s} {'on final':>9s}"]
        for r in self.rows:
            lines.append(f"  {r['label']:28s} {r['step']:8d} {r['hit_ratio']:10.3f} {r['top_k_mass']:11.3f} "
                         f"{r['final_top_k_mass']:9.3f}")
        return "\n".join(lines)


def checkpoint_step(label: str, index: int) -> int:
    """The training step a checkpoint's name carries (``step400``, ``checkpoint-1200``: the last
    number in it), else its position in the series."""
    numbers = re.findall(r"\d+", Path(label).name)
    return int(numbers[-1]) if numbers else index


def load_checkpoint(folder: str | Path) -> ResidualProgram:
    """A Hugging Face model folder (config.json + weights), captured."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a model folder (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return capture(model)


def _program(item: nn.Module | ResidualProgram | str | Path) -> ResidualProgram:
    if isinstance(item, ResidualProgram):
        return item
    if isinstance(item, nn.Module):
        return capture(item)
    return load_checkpoint(item)


@torch.no_grad()
def _top_table(reader: RowReader, sources: torch.Tensor, k: int,
               final: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(flat indices row·V + next of the top k, their probabilities, mass on ``final``)."""
    vocab = reader.vocab
    best_v, best_i = torch.empty(0, dtype=torch.double), torch.empty(0, dtype=torch.long)
    on_final = 0.0
    for start in range(0, len(sources), reader.chunk):
        probs = reader(sources[start:start + reader.chunk]).exp()
        values, flat = probs.flatten().topk(min(k, probs.numel()))
        best_v, best_i = torch.cat([best_v, values]), torch.cat([best_i, flat + start * vocab])
        keep = best_v.topk(min(k, best_v.numel())).indices
        best_v, best_i = best_v[keep], best_i[keep]
        if final is not None:
            inside = (final >= start * vocab) & (final < (start + len(probs)) * vocab)
            on_final += float(probs.flatten()[final[inside] - start * vocab].sum())
    return best_i, best_v, on_final


def checkpoint_curves(models_or_folders: Sequence[nn.Module | ResidualProgram | str | Path],
                      path: str = DEFAULT_READOUT, k: int = 100, rows: Sequence[int] | None = None,
                      first_tokens: int | None = None, labels: Sequence[str] | None = None,
                      steps: Sequence[int] | None = None, chunk: int = 1024,
                      progress: bool = True, *,
                      convention: InputConvention | Sequence[int] | None = None) -> CheckpointCurves:
    """Hit ratio, top-k mass and mass on the final top-k of one read-out for every checkpoint
    (module docstring); ``rows``: the source tokens (default every token)."""
    items = list(models_or_folders)
    if len(items) < 2:
        raise ValueError("checkpoint curves need at least two checkpoints (the last is the final one)")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    labels = list(labels) if labels is not None else [
        str(i) if not isinstance(i, (str, Path)) else Path(i).name for i in items]
    if steps is None:
        steps = [checkpoint_step(label, n) for n, label in enumerate(labels)]
    steps = list(steps)
    if len(labels) != len(items) or len(steps) != len(items):
        raise ValueError("give one label and one step per checkpoint")
    final_prog = _program(items[-1])
    vocab = int(final_prog.decoder.unembedding.shape[0])
    sources = torch.arange(vocab) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    final_reader = RowReader(final_prog, path, first_tokens, convention=convention, chunk=chunk)
    final_top, final_probs, _ = _top_table(final_reader, sources, k, None)
    final_set = set(final_top.tolist())
    out = []
    for index, item in enumerate(tqdm(items, desc="checkpoints", disable=not progress, leave=False)):
        if index == len(items) - 1:
            top, probs, on_final = final_top, final_probs, float(final_probs.sum())
        else:
            prog = _program(item)
            if int(prog.decoder.unembedding.shape[0]) != vocab:
                raise ValueError(f"checkpoint {labels[index]!r} has another vocabulary size than the "
                                 "final one")
            reader = RowReader(prog, path, first_tokens, convention=convention, chunk=chunk)
            top, probs, on_final = _top_table(reader, sources, k, final_top.sort().values)
        out.append({"label": labels[index], "step": int(steps[index]),
                    "hit_ratio": len(set(top.tolist()) & final_set) / len(final_set),
                    "top_k_mass": float(probs.sum()), "final_top_k_mass": on_final})
    return CheckpointCurves(final_reader.describe(), k, out)
