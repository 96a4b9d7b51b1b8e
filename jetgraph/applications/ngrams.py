"""Jet n-grams: n-gram tables read from the weights (paper §4).

A path that skips every attention unit sees one token only, so evaluated on every vocabulary
token it is a bigram table: ``E→U`` (the embedding decoded directly), ``E→mlp3→U``, MLP
compositions. A path through one attention unit, evaluated on token pairs, is a skip-bigram /
trigram table. Tables are streamed in row chunks through the codegen's batched evaluator — the
V×V table is never held unless asked — keeping a global top-k, a row-wise top-k and, given a
keyword set, each row's probability mass on it. Progress is shown with tqdm and saved after every
chunk, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.ir import ResidualProgram
from jetgraph.passes.expand import Expansion, Term, source_terms

ALIASES = {"e": "embed.token", "embed": "embed.token", "u": "unembed", "unembed": "unembed"}


def path_term(prog: ResidualProgram, spec: str | Term, order: int | None = None) -> Term:
    """A logit-space path term from text: ``"E→U"``, ``"E→mlp3→U"``, ``"E→MLP_last^1→U"``.

    Steps are separated by ``→`` or ``->``; ``E`` is the token embedding, ``U`` the decoder, the
    others are unit names of the sublayer view (``attn0``, ``mlp3``) or ``MLP_last`` /
    ``ATTN_last``; ``^j`` takes the order-j Taylor coefficient at that step (default 0). ``order``
    is the jets' truncation depth (default: the largest j on the path).
    """
    view = prog.at("sublayer")
    if isinstance(spec, Term):
        if spec.space != "logits":
            raise ValueError(f"an n-gram path must end in the decoder (logit space), got {spec!r}")
        return spec
    steps = [s.strip() for s in spec.replace("->", "→").split("→") if s.strip()]
    if len(steps) < 2:
        raise ValueError(f"path {spec!r} needs at least a source and the decoder, e.g. 'E→U'")
    parsed = []
    for step in steps:
        name, _, power = step.partition("^")
        parsed.append((name, int(power) if power else 0))
    depth = order if order is not None else max(j for _, j in parsed)
    units = {u.name: u for u in view.units}
    mlps = [u.name for u in view.units if u.kind == "mlp"]
    attns = [u.name for u in view.units if u.kind == "attn"]
    aliases = {"mlp_last": mlps[-1] if mlps else None, "attn_last": attns[-1] if attns else None}
    source_name = ALIASES.get(parsed[0][0].lower(), parsed[0][0])
    sources = {t.path[0]: t for t in source_terms(view)}
    if source_name not in sources:
        raise ValueError(f"path {spec!r} starts at {parsed[0][0]!r}; sources are E (= embed.token) and "
                         f"{sorted(sources)}")
    if ALIASES.get(parsed[-1][0].lower()) != "unembed":
        raise ValueError(f"path {spec!r} must end at U (the decoder)")
    term = sources[source_name]
    previous = -1
    for name, j in parsed[1:-1]:
        unit = aliases.get(name.lower()) or name
        if unit not in units:
            raise ValueError(f"path {spec!r} names unknown unit {name!r}; units: {list(units)} "
                             "(or MLP_last, ATTN_last)")
        if units[unit].index <= previous:
            raise ValueError(f"path {spec!r}: units must appear in model order")
        previous = units[unit].index
        term = term.then(unit, j, depth)
    return term.then("unembed", parsed[-1][1], depth, space="logits")


def context_length(term: Term) -> int:
    """Tokens of context a path sees: 1 without attention, 2 through attention units."""
    units = []
    node = term
    while node is not None:
        if node.unit is not None:
            units.append(node.unit)
        node = node.center
    return 2 if any(u.startswith("attn") for u in units) else 1


@dataclass
class NgramTable:
    """The streamed result of one path over a set of contexts.

    ``top`` holds the global top-k as (logit, context row, next token); ``row_top`` the
    per-context top-k ids and logits; ``log_normaliser`` each row's logsumexp (so probabilities
    are exp(logit − normaliser)); ``keyword_logits`` each row's logits at the keyword tokens, from
    which :meth:`keyword_mass` gives the probability on the whole set or any subset.
    """

    path: str
    contexts: torch.Tensor  # [rows, n-1] token ids
    top_values: torch.Tensor
    top_index: torch.Tensor  # flat row * vocab + next token
    vocab: int
    row_values: torch.Tensor | None = None
    row_index: torch.Tensor | None = None
    log_normaliser: torch.Tensor | None = None
    keyword_logits: torch.Tensor | None = None  # [rows, len(keywords)]
    keywords: list[int] = field(default_factory=list)
    rank: str = "logit"  # what top_values hold: logits, or log-probabilities ("prob")

    def keyword_mass(self, subset: Sequence[int] | None = None) -> torch.Tensor:
        """Each row's probability on the keywords (or on ``subset``, token ids among them)."""
        if self.keyword_logits is None or self.log_normaliser is None:
            raise ValueError("this table was built without keywords")
        columns = slice(None)
        if subset is not None:
            position = {k: i for i, k in enumerate(self.keywords)}
            missing = sorted(set(subset) - set(position))
            if missing or not subset:
                raise ValueError("subset must be a non-empty list of the table's keywords; "
                                 f"not in it: {missing}")
            columns = [position[k] for k in subset]
        return torch.exp(torch.logsumexp(self.keyword_logits[:, columns], -1) - self.log_normaliser)

    def entries(self, tokenizer=None) -> list[dict]:
        """The global top-k as rows: rank, context, next token, logit, probability (when the row
        normalisers were kept)."""
        rows = []
        for rank, (value, flat) in enumerate(zip(self.top_values.tolist(), self.top_index.tolist(),
                                                 strict=True), start=1):
            row, token = divmod(int(flat), self.vocab)
            context = self.contexts[row].tolist()
            logit = value + float(self.log_normaliser[row]) if self.rank == "prob" else value
            entry = {"rank": rank, "context_ids": " ".join(map(str, context)), "next_id": token,
                     "logit": round(logit, 5)}
            if self.log_normaliser is not None:
                entry["prob"] = round(float(torch.exp(logit - self.log_normaliser[row])), 6)
            if tokenizer is not None:
                entry["context"] = tokenizer.decode(context)
                entry["next"] = tokenizer.decode([token])
            rows.append(entry)
        return rows

    def export(self, path: str | Path, tokenizer=None) -> Path:
        """The global top-k as CSV or JSON (by suffix), decoded with ``tokenizer`` if given."""
        path = Path(path)
        rows = self.entries(tokenizer)
        if path.suffix not in (".csv", ".json"):
            raise ValueError(f"export writes .csv or .json, not {path.suffix!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps({"path": self.path, "top": rows}, indent=1, ensure_ascii=False) + "\n")
        else:
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return path

    def mass(self, subset: Sequence[int] | None = None, samples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> dict[str, float]:
        """Mean probability mass on the keyword set (or a subset) over contexts, with a bootstrap
        confidence interval."""
        return bootstrap_mean(self.keyword_mass(subset), samples, confidence, seed)


def bootstrap_mean(values: torch.Tensor, samples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` and a percentile bootstrap confidence interval (resampling rows)."""
    values = values.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    means = values[draws].mean(1)
    alpha = (1 - confidence) / 2
    return {"mean": values.mean().item(), "low": means.quantile(alpha).item(),
            "high": means.quantile(1 - alpha).item(), "confidence": confidence, "samples": samples}


def all_contexts(vocab: int, length: int, first: Sequence[int] | None = None,
                 second: Sequence[int] | None = None) -> torch.Tensor:
    """Every context: all tokens (length 1) or all pairs first × second (length 2)."""
    if length == 1:
        tokens = torch.arange(vocab) if first is None else torch.as_tensor(list(first))
        return tokens.unsqueeze(1)
    a = torch.arange(vocab) if first is None else torch.as_tensor(list(first))
    b = torch.arange(vocab) if second is None else torch.as_tensor(list(second))
    return torch.cartesian_prod(a, b).view(-1, 2)


@torch.no_grad()
def ngram_table(
    prog: ResidualProgram,
    path: str | Term,
    *,
    order: int | None = None,
    contexts: torch.Tensor | None = None,
    top: int = 100,
    row_top: int = 0,
    keywords: Sequence[int] | None = None,
    normalise: bool = False,
    rank: str = "logit",
    chunk: int = 1024,
    resume: str | Path | None = None,
    progress: bool = True,
) -> NgramTable:
    """Evaluate one path on every context (default: every token, or every token pair for paths
    through attention) in chunks, keeping the global top-``top``.

    ``row_top``: also keep each row's top tokens. ``keywords``: token ids whose probability mass
    each row puts on them is recorded (implies ``normalise``). ``normalise``: record each row's
    logsumexp, so probabilities can be reported. ``rank``: order the global top-k by ``"logit"``
    (the paper's tables; one pass less) or by conditional probability ``"prob"`` (implies
    ``normalise``; a next token that is large in every row no longer fills the table).
    ``resume``: a checkpoint file written after every chunk; an interrupted call with the same
    arguments continues from it.
    """
    term = path_term(prog, path, order)
    view = prog.at("sublayer")
    vocab = int(view.decoder.unembedding.shape[0]) if view.decoder.unembedding is not None else None
    if vocab is None:
        raise ValueError("the decoder has no affine readout: cannot size the vocabulary")
    length = context_length(term)
    contexts = all_contexts(vocab, length) if contexts is None else torch.as_tensor(contexts).long()
    if contexts.dim() != 2 or contexts.shape[1] != length:
        raise ValueError(f"path {term.name!r} reads {length} token(s) of context: contexts must be "
                         f"[rows, {length}], got {tuple(contexts.shape)}")
    if contexts.numel() and (contexts.min() < 0 or contexts.max() >= vocab):
        raise ValueError(f"context token ids must lie in [0, {vocab})")
    if keywords is not None:
        keywords = sorted({int(k) for k in keywords})
        if not keywords:
            raise ValueError("the keyword list is empty: give at least one token id")
        if keywords[0] < 0 or keywords[-1] >= vocab:
            raise ValueError(f"keyword token ids must lie in [0, {vocab})")
        normalise = True
    if top < 1 or chunk < 1:
        raise ValueError("top and chunk must be >= 1")
    if rank not in ("logit", "prob"):
        raise ValueError(f"rank must be 'logit' or 'prob', got {rank!r}")
    normalise = normalise or rank == "prob"
    schedule = _schedule(view, term)
    device = view.decoder.unembedding.device
    state = _State.start(term.name, contexts, top, row_top, normalise, keywords, chunk, resume, rank)
    rows = contexts.shape[0]
    bar = tqdm(total=rows, initial=state.done, unit="ctx", desc=f"n-grams {term.name}", disable=not progress,
               leave=False)
    keyword_index = torch.tensor(keywords, device=device) if keywords else None
    while state.done < rows:
        start, end = state.done, min(state.done + chunk, rows)
        logits = _evaluate(schedule, contexts[start:end].to(device))
        state.add(logits, start, keyword_index)
        state.done = end
        state.save()
        bar.update(end - start)
    bar.close()
    return state.table(term.name, contexts, vocab, keywords or [])



def _schedule(view: ResidualProgram, term: Term) -> Schedule:
    """The batched plan of one logit-space path term."""
    return plan(Expansion(view, len(view.units), [term], "logits", term.depth))


def _evaluate(schedule: Schedule, ids: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits of the single path term at the last position."""
    outputs, _, _ = BatchedRun(schedule, ids).run(remainder=False)
    return outputs[0, :, -1, :]


@dataclass
class _State:
    """Streaming reductions, and their checkpoint."""

    key: str
    top: int
    row_top: int
    normalise: bool
    resume: Path | None
    rank: str = "logit"
    done: int = 0
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    row_values: list[torch.Tensor] = field(default_factory=list)
    row_index: list[torch.Tensor] = field(default_factory=list)
    normaliser: list[torch.Tensor] = field(default_factory=list)
    keyword_logits: list[torch.Tensor] = field(default_factory=list)  # per chunk

    @classmethod
    def start(cls, name, contexts, top, row_top, normalise, keywords, chunk, resume, rank) -> _State:
        digest = hashlib.sha256()
        digest.update(json.dumps([name, top, row_top, normalise, keywords, chunk, rank]).encode())
        digest.update(contexts.numpy().tobytes())
        state = cls(digest.hexdigest(), top, row_top, normalise, Path(resume) if resume else None, rank)
        if state.resume is not None and state.resume.is_file():
            saved = torch.load(state.resume, weights_only=False)
            if saved.get("key") != state.key:
                raise ValueError(f"checkpoint {state.resume} belongs to another table (different path, "
                                 "contexts or options): delete it or choose another file")
            state.__dict__.update({k: v for k, v in saved.items() if k != "key"})
        return state

    def add(self, logits: torch.Tensor, offset: int, keyword_index: torch.Tensor | None) -> None:
        vocab = logits.shape[-1]
        row_max = logits.amax(-1)
        normaliser = _log_normaliser(logits, row_max) if self.normalise else None
        threshold = self.values[-1] if len(self.values) == self.top else None
        values, flat = _chunk_top(logits, self.top, threshold, normaliser if self.rank == "prob" else None,
                                  row_max)
        values, flat = values.cpu(), flat.cpu() + offset * vocab
        merged_values = torch.cat([self.values, values])
        merged_index = torch.cat([self.index, flat])
        keep = merged_values.topk(min(self.top, merged_values.numel())).indices
        self.values, self.index = merged_values[keep], merged_index[keep]
        if self.row_top:
            v, i = logits.topk(min(self.row_top, vocab), -1)
            self.row_values.append(v.cpu())
            self.row_index.append(i.cpu())
        if normaliser is not None:
            self.normaliser.append(normaliser.cpu())
            if keyword_index is not None:
                self.keyword_logits.append(logits.float().index_select(-1, keyword_index).cpu())

    def save(self) -> None:
        if self.resume is None:
            return
        payload = {k: v for k, v in self.__dict__.items() if k != "resume"}
        self.resume.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.resume.parent, suffix=".tmp")
        os.close(handle)
        torch.save(payload, temporary)
        os.replace(temporary, self.resume)

    def table(self, name: str, contexts: torch.Tensor, vocab: int, keywords: list[int]) -> NgramTable:
        return NgramTable(
            name, contexts, self.values, self.index, vocab,
            row_values=torch.cat(self.row_values) if self.row_values else None,
            row_index=torch.cat(self.row_index) if self.row_index else None,
            log_normaliser=torch.cat(self.normaliser) if self.normaliser else None,
            keyword_logits=torch.cat(self.keyword_logits) if self.keyword_logits else None,
            keywords=keywords,
            rank=self.rank,
        )


def _log_normaliser(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Each row's logsumexp, 4× faster than ``torch.logsumexp`` on CPU for wide rows.

    exp() of arguments far below −88 takes a slow path; they are clamped at −80 first. Every
    clamped entry then adds e^−80 instead of something smaller, a relative error below
    V·e^−80 ≈ 1e−30 for V = 49152 (the sum is ≥ 1): nothing in float32.
    """
    shifted = (logits.float() - row_max.float().unsqueeze(-1)).clamp_(min=-80.0).exp_()
    return shifted.sum(-1).log_().add_(row_max.float())


def _chunk_top(logits: torch.Tensor, top: int, threshold: torch.Tensor | None,
               shift: torch.Tensor | None, row_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's top entries (value, flat index), reading the big table only twice.

    An entry among the chunk's ``top`` largest lies in one of the ``top`` rows with the largest
    maxima (each row with a larger maximum holds a distinct larger entry), so one row-max pass
    picks ≤ ``top`` candidate rows; rows whose maximum cannot beat the running threshold (the
    current top-th value) are dropped before the exact top-k over the candidates. ``shift``
    (per row) ranks logits − shift instead: log-probabilities when it is the row's logsumexp.
    """
    if shift is not None:
        row_max = row_max - shift
    rows = row_max.topk(min(top, row_max.numel())).indices
    if threshold is not None:
        rows = rows[row_max[rows] > threshold.to(row_max.device)]
        if rows.numel() == 0:
            return logits.new_empty(0), torch.empty(0, dtype=torch.long, device=logits.device)
    candidates = logits.index_select(0, rows)
    if shift is not None:
        candidates = candidates - shift[rows, None]
    values, flat = candidates.reshape(-1).topk(min(top, candidates.numel()))
    vocab = logits.shape[-1]
    return values, rows[flat // vocab] * vocab + flat % vocab


@torch.no_grad()
def full_table(prog: ResidualProgram, path: str | Term, contexts: torch.Tensor | None = None,
               chunk: int = 1024, max_entries: int = 50_000_000) -> torch.Tensor:
    """The whole [contexts, vocab] logit table (only when asked: refuses more than ``max_entries``)."""
    term = path_term(prog, path)
    view = prog.at("sublayer")
    vocab = int(view.decoder.unembedding.shape[0])
    contexts = all_contexts(vocab, context_length(term)) if contexts is None else torch.as_tensor(contexts)
    if contexts.shape[0] * vocab > max_entries:
        raise ValueError(f"the full table has {contexts.shape[0] * vocab:,} entries, more than max_entries "
                         f"{max_entries:,}: stream it with ngram_table instead")
    schedule = _schedule(view, term)
    device = view.decoder.unembedding.device
    parts = [_evaluate(schedule, contexts[i:i + chunk].to(device)).cpu()
             for i in range(0, contexts.shape[0], chunk)]
    return torch.cat(parts)


# ----------------------------------------------------------------- analyses
def keyword_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token ids of a keyword list: every word's first token, with and without a leading space."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ValueError("the keyword list is empty")
    ids: set[int] = set()
    for word in words:
        for variant in (word, " " + word):
            encoded = tokenizer(variant, add_special_tokens=False).input_ids
            if encoded:
                ids.add(int(encoded[0]))
    return sorted(ids)


def load_keywords(name_or_path: str | Path) -> list[str]:
    """A shipped keyword list (``"refusal"``, ``"toxic"``) or a text file, one entry per line."""
    from importlib import resources

    candidate = Path(name_or_path)
    if candidate.is_file():
        text = candidate.read_text(encoding="utf-8")
    else:
        shipped = resources.files("jetgraph.data").joinpath(f"keywords_{name_or_path}.txt")
        if not shipped.is_file():
            raise ValueError(f"no keyword list {str(name_or_path)!r}: give a file or one of "
                             "'refusal', 'toxic'")
        text = shipped.read_text(encoding="utf-8")
    words = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not words:
        raise ValueError(f"the keyword list {str(name_or_path)!r} is empty")
    return words


@torch.no_grad()
def diff_tables(prog_a: ResidualProgram, prog_b: ResidualProgram, path: str, top: int = 50,
                contexts: torch.Tensor | None = None, chunk: int = 1024,
                progress: bool = True) -> dict[str, list[tuple[int, int, float, float]]]:
    """Ranked changes of one path's bigram probabilities from model A to model B.

    Returns the ``top`` largest increases and decreases as (context row, next token, p_A, p_B).
    Both models must share a vocabulary."""
    term_a, term_b = path_term(prog_a, path), path_term(prog_b, path)
    va, vb = prog_a.decoder.unembedding, prog_b.decoder.unembedding
    if va is None or vb is None or va.shape[0] != vb.shape[0]:
        raise ValueError("diff_tables needs two models with the same vocabulary size "
                         f"({None if va is None else va.shape[0]} vs {None if vb is None else vb.shape[0]})")
    vocab = int(va.shape[0])
    contexts = all_contexts(vocab, context_length(term_a)) if contexts is None else torch.as_tensor(contexts)
    views = prog_a.at("sublayer"), prog_b.at("sublayer")
    schedules = [_schedule(v, t) for v, t in zip(views, (term_a, term_b), strict=True)]
    best = {"increase": (torch.empty(0), torch.empty(0, dtype=torch.long)),
            "decrease": (torch.empty(0), torch.empty(0, dtype=torch.long))}
    probs_at: dict[int, tuple[float, float]] = {}
    for start in tqdm(range(0, contexts.shape[0], chunk), desc="diff", disable=not progress, leave=False):
        ids = contexts[start:start + chunk]
        pa = _evaluate(schedules[0], ids).float().softmax(-1)
        pb = _evaluate(schedules[1], ids).float().softmax(-1)
        delta = (pb - pa).reshape(-1)
        for direction, sign in (("increase", 1.0), ("decrease", -1.0)):
            values, flat = (sign * delta).topk(min(top, delta.numel()))
            flat = flat + start * vocab
            for f in flat.tolist():
                r, c = divmod(f, vocab)
                probs_at[f] = (pa[r - start, c].item(), pb[r - start, c].item())
            merged_v = torch.cat([best[direction][0], values])
            merged_i = torch.cat([best[direction][1], flat])
            keep = merged_v.topk(min(top, merged_v.numel())).indices
            best[direction] = (merged_v[keep], merged_i[keep])
    result = {}
    for direction, (_, flat) in best.items():
        result[direction] = [(divmod(f, vocab)[0], divmod(f, vocab)[1], *probs_at[f]) for f in flat.tolist()]
    return result


def compare_to_reference(table_logits: torch.Tensor, reference: torch.Tensor,
                         k: int = 100) -> dict[str, float]:
    """A full jet bigram table against a reference (true chain rows or corpus counts), both
    [V, V] (rows: context token). Reports the top-1 hit ratio per row (rows with data), the mean
    KL(reference row ‖ jet row), the global top-k hit ratio |top-k jet ∩ top-k reference| / k and
    the total mass: the share of the reference's joint bigram mass that the jet's top-k covers."""
    reference = reference.double()
    counts = reference.sum(-1)
    rows = counts > 0
    ref_rows = reference[rows] / counts[rows, None]
    jet_log = table_logits[rows].double().log_softmax(-1)
    top1 = (jet_log.argmax(-1) == ref_rows.argmax(-1)).double().mean().item()
    kl = (ref_rows * (torch.log(ref_rows.clamp_min(1e-300)) - jet_log)).where(ref_rows > 0,
                                                                              torch.zeros(())).sum(-1)
    joint = reference / reference.sum()
    jet_joint = table_logits.double().log_softmax(-1)
    jet_top = set(jet_joint.where(rows[:, None], torch.tensor(-torch.inf, dtype=torch.double))
                  .flatten().topk(k).indices.tolist())
    ref_top = set(joint.flatten().topk(k).indices.tolist())
    mass = joint.flatten()[list(jet_top)].sum().item()
    return {"top1_hit_ratio": top1, "mean_kl": kl.mean().item(),
            f"top{k}_hit_ratio": len(jet_top & ref_top) / k, f"top{k}_mass": mass, "rows": int(rows.sum())}
