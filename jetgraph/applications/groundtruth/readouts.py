"""Bigram read-outs: data-free [V, V] tables of next-token logits computed from a captured model.

Every read-out is a function of the weights alone (no corpus). Rows are the context token, columns
the next token. The families the ground-truth study compares:

- **single attention-free paths** (``E→U``, ``E→mlp0→U``, …): order-0 terms that see one token;
- **their sums**, with unit weights (the logits added) and uniform weights (their mean);
- **order-1 paths**: the attention-free paths with one unit (or the decoder) at its order-1
  Taylor coefficient, and the order-≤1 sum;
- **the model on one token** (``h_last→U``: the stream after the last unit, decoded, at position
  0, where attention over one position is a function of that token alone), and its **expansion
  into paths** at one token (attention paths included): the sum of all order-0 paths, and of the
  paths from the token embedding alone;
- **the library's default read-out** (:mod:`jetgraph.applications.ngrams.readout`): the model
  after each token, averaged over the 16 first tokens it expects most;
- **the model after every token**: ``h_last→U`` on every pair (a, b), its probabilities for
  the token after b averaged over a (uniformly: data-free);
- **the tied identity removed**: the one-token output minus the direct ``E→U`` path, or with
  ``E→U``'s row direction projected out;
- **fitted combinations**: weights on the attention-free path tables fitted by least squares to
  the model's own one-token logits (no corpus), with and without ``E→U``.
"""

from __future__ import annotations

import itertools

import torch

from jetgraph.applications.ngrams import full_table
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import DEFAULT_FIRST_TOKENS, bigram_readout
from jetgraph.ir import ResidualProgram
from jetgraph.passes.paths import expand_paths
from jetgraph.passes.pathspec import format_path, format_step, parse_path

ONE_TOKEN = "h_last→U"
SUM = "sum of attention-free paths"
MEAN = "mean of attention-free paths"
ORDER1_SUM = "order-≤1 sum of attention-free paths"
PATHS_SUM = "one-token paths: sum (all sources)"
TOKEN_PATHS_SUM = "one-token paths: sum (token source)"
MINUS_DIRECT = "h_last→U minus E→U"
PROJECT_DIRECT = "h_last→U with E→U projected out"
FITTED = "fitted to h_last→U: attention-free paths"
FITTED_NO_DIRECT = "fitted to h_last→U: attention-free paths without E→U"
FITTED_SHORT = "fitted to h_last→U: E→U and E→mlpᵢ→U"
AFTER_EVERY_TOKEN = "h_last→U after every token, averaged"
DEFAULT = "default: h_last→U averaged over 16 expected first tokens"
MAX_PAIR_ROWS = 1 << 20
MAX_EXPANSION_PATHS = 4096


def attention_free_paths(prog: ResidualProgram) -> list[str]:
    """Every order-0 path from the token embedding through an increasing subset of MLP units to
    the decoder (2^M paths for M MLP units)."""
    mlps = [u.name for u in prog.at("sublayer").units if u.kind == "mlp"]
    subsets = itertools.chain.from_iterable(itertools.combinations(mlps, r) for r in range(len(mlps) + 1))
    return [format_path(["E", *subset, "U"]) for subset in subsets]


def order1_paths(prog: ResidualProgram) -> list[str]:
    """The attention-free paths with exactly one step (a unit or the decoder) at order 1."""
    out = []
    for path in attention_free_paths(prog):
        steps = [*parse_path(path).units, "U"]
        for i in range(len(steps)):  # each unit, then the decoder, at order 1
            out.append(format_path(["E", *(format_step(s, int(j == i)) for j, s in enumerate(steps))]))
    return out


def one_token_logits(prog: ResidualProgram) -> torch.Tensor:
    """The model's own logits for every token alone at position 0 (``h_last→U``)."""
    return full_table(prog, ONE_TOKEN).float()


def without_direction(rows: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Each row with its component along the matching (row-centred) direction removed; rows are
    centred first, since a constant shift of logits changes no probability."""
    rows = rows - rows.mean(-1, keepdim=True)
    directions = directions - directions.mean(-1, keepdim=True)
    norms = (directions * directions).sum(-1, keepdim=True).clamp_min(1e-12)
    scale = (rows * directions).sum(-1, keepdim=True) / norms
    return rows - scale * directions


def fit_weights(tables: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Least-squares weights w minimising Σ_rows ‖centre(Σ_p w_p T_p) − centre(target)‖² (rows
    centred: logits are defined up to a constant per row), in float64."""
    design = torch.stack([t.double() - t.double().mean(-1, keepdim=True) for t in tables], -1)
    goal = target.double() - target.double().mean(-1, keepdim=True)
    return torch.linalg.lstsq(design.reshape(-1, len(tables)), goal.reshape(-1, 1)).solution[:, 0]


@torch.no_grad()
def bigram_readouts(prog: ResidualProgram, order1: bool = True) -> dict[str, torch.Tensor]:
    """Every read-out of the study, by name ([V, V] float32 logits each). The one-token path
    expansion is left out for models with more than ``MAX_EXPANSION_PATHS`` paths."""
    paths = attention_free_paths(prog)
    out = {path: full_table(prog, path).float() for path in paths}
    out[SUM] = sum(out[p] for p in paths)
    out[MEAN] = out[SUM] / len(paths)
    if order1:
        first = {path: full_table(prog, path).float() for path in order1_paths(prog)}
        out.update(first)
        out[ORDER1_SUM] = out[SUM] + sum(first.values())
    own = one_token_logits(prog)
    out[ONE_TOKEN] = own
    # the study's models are trained on windows of a stream with no start token: no prefix
    out[DEFAULT] = bigram_readout(prog, DEFAULT_FIRST_TOKENS, convention=InputConvention()).float()
    expansion = expand_paths(prog.at("sublayer"))
    if expansion.count() <= MAX_EXPANSION_PATHS:
        vocab = own.shape[-1]
        values = expansion.expansion().evaluate(torch.arange(vocab).view(-1, 1))
        terms = {name: value[:, 0].float() for name, value in values.terms.items()}
        out[PATHS_SUM] = sum(terms.values())
        out[TOKEN_PATHS_SUM] = sum(v for name, v in terms.items() if name.startswith("embed.token"))
    direct = out["E→U"]
    out[MINUS_DIRECT] = own - direct
    out[PROJECT_DIRECT] = without_direction(own, direct)
    weights = fit_weights([out[p] for p in paths], own)
    out[FITTED] = sum(w.item() * out[p] for w, p in zip(weights, paths, strict=True))
    rest = paths[1:]
    weights = fit_weights([out[p] for p in rest], own)
    out[FITTED_NO_DIRECT] = sum(w.item() * out[p] for w, p in zip(weights, rest, strict=True))
    short = [p for p in paths if p.count("→") <= 2]
    weights = fit_weights([out[p] for p in short], own)
    out[FITTED_SHORT] = sum(w.item() * out[p] for w, p in zip(weights, short, strict=True))
    if own.shape[0] ** 2 <= MAX_PAIR_ROWS:
        out[AFTER_EVERY_TOKEN] = after_every_token(prog)
    return out


def after_every_token(prog: ResidualProgram, chunk: int = 4096) -> torch.Tensor:
    """log of the model's next-token probabilities after b, averaged over every first token a of
    the pair (a, b): [V, V] (rows: b)."""
    vocab = int(prog.decoder.unembedding.shape[0])
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    probs = torch.cat([full_table(prog, ONE_TOKEN, contexts=pairs[i:i + chunk]).double().softmax(-1)
                       for i in range(0, len(pairs), chunk)])
    return probs.view(vocab, vocab, vocab).mean(0).log().float()
