"""One-call entry points from a Hugging Face model (or a captured program): ``jetgraph.lens``
and ``jetgraph.ngrams``. A model is captured first (``jetgraph.capture``); to run several
read-outs on one model, capture it once and pass the program."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from jetgraph.applications.explain import (
    FrozenNetwork,
    PathAttribution,
    check_explain_options,
    explain_program,
    token_id,
)
from jetgraph.applications.explain.attention import ScoreAttribution, attention_score_attribution
from jetgraph.applications.explain.compute import DEFAULT_BUDGET, DEFAULT_GOAL
from jetgraph.applications.lens import LensAverage, LensResult, iterative_lenses, lens_over_prompts
from jetgraph.applications.ngrams import NgramTable, keyword_ids, load_keywords
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.ngrams.query import renamed_options
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT
from jetgraph.applications.ngrams.tables import RUN_OPTIONS, TableSet
from jetgraph.applications.targets import token_label
from jetgraph.capture import capture
from jetgraph.cost import DEFAULT_MAX_SECONDS, check_plan
from jetgraph.ir import DEFAULT_GRANULARITY, ResidualProgram, as_input_ids, check_granularity
from jetgraph.passes.pathspec import PathSpec
from jetgraph.passes.terms import Term


def lens(model_or_program: nn.Module | ResidualProgram,
         input_ids_or_text: torch.Tensor | str | Sequence[str],
         orders: Sequence[int] = (0, 1, 2), layers: Sequence[int] | None = None, tokenizer: object = None,
         *, granularity: str | None = None, k: int = 5, attention_mask: torch.Tensor | None = None,
         batch_size: int = 8, progress: bool = True) -> dict[int, LensResult] | dict[int, LensAverage]:
    """The iterative jet lens of a model at every order in ``orders``, from one Taylor pass.

    ``model_or_program``: a causal LM (captured here) or a :class:`~jetgraph.ir.ResidualProgram`.
    ``input_ids_or_text``: token ids [batch, seq] (or [seq], padded as ``attention_mask`` says),
    or a text with its ``tokenizer``: one :class:`~jetgraph.applications.lens.LensResult` per
    order (``result[1].metrics["cosine"]``). A list of texts runs in padded batches of
    ``batch_size`` with a progress bar and gives one
    :class:`~jetgraph.applications.lens.LensAverage` per order: each centre's metrics per prompt,
    averaged over the prompts by ``table()``. ``layers``: the stream states to decode (0 = the
    embedding .. N; default all).
    """
    if isinstance(input_ids_or_text, (list, tuple)):
        texts = _texts(input_ids_or_text, tokenizer)
        prog = _program(model_or_program, granularity)
        prompts = [_input_ids(prog, text, tokenizer)[0] for text in texts]
        side = getattr(tokenizer, "padding_side", "left")
        return lens_over_prompts(prog, prompts, orders, k=k, batch_size=batch_size, granularity=granularity,
                                 layers=layers, side=side if prog.reads_mask else "right", progress=progress)
    prog = _program(model_or_program, granularity)
    ids = _input_ids(prog, input_ids_or_text, tokenizer)
    return iterative_lenses(prog, ids, orders, k=k, granularity=granularity, layers=layers,
                            attention_mask=attention_mask)


def _texts(values: Sequence[object], tokenizer: object) -> list[str]:
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError("a list input must hold texts (str), at least one; for token ids give a tensor "
                        "[batch, seq] and its attention_mask")
    if tokenizer is None:
        raise ValueError("texts need their tokenizer: pass tokenizer=")
    empty = [i for i, v in enumerate(values) if not v.strip()]  # type: ignore[union-attr]
    if empty:
        raise ValueError(f"texts {empty[:5]} are empty: every prompt needs at least one token")
    return list(values)  # type: ignore[arg-type]


def ngrams(model_or_program: nn.Module | ResidualProgram, path: str | PathSpec | Term = DEFAULT_READOUT, *,
           tokenizer: object = None, convention: InputConvention | Sequence[int] | None = None,
           keywords: str | Sequence[str] | Sequence[int] | None = None, top: int = 100, rank: str = "prob",
           sources: int | Sequence[int] | None = None, first_tokens: int | FirstTokens | None = None,
           **options: object) -> NgramTable:
    """The n-gram table of one path of a model or program, streamed over every context.

    The default, ``"h_last→U"``, is the model's own next-token distribution after each token,
    read the way the tokenizer builds text (:mod:`jetgraph.applications.ngrams.convention`):
    after the tokenizer's BOS when it adds one, else averaged over the ``first_tokens`` tokens
    the model expects most before it (default 16; with a BOS, default 0: BOS alone; or a
    :class:`~jetgraph.applications.ngrams.FirstTokens` value). It needs the ``tokenizer`` or an
    explicit ``convention`` (``InputConvention((bos_id,))``, or ``InputConvention()`` for a
    model trained without a start token). Paths such as ``"E→U"``, ``"E→MLP_last→U"``,
    ``"E→attn0→U"`` (:mod:`jetgraph.passes.pathspec`) read their own tokens only.

    ``sources``: the rows (first context tokens): an int N means the N tokens the model itself
    predicts most, without the tokenizer's special, unused and byte tokens
    (:func:`~jetgraph.applications.ngrams.sources.common_tokens`); a sequence gives ids.
    ``keywords``: token ids, a list of words, or a shipped list name (``"toxic"``, ``"refusal"``)
    or file; words need the ``tokenizer``. Every other option is a field of
    :class:`~jetgraph.applications.ngrams.NgramQuery` (``contexts``, ``row_top``, ``last_top``,
    ``normalise``, ``order``) or :class:`~jetgraph.applications.ngrams.RunOptions` (``chunk``,
    ``resume``, ``max_seconds``, ``progress``, ``shard``, …); an unknown one is refused by name.
    The cost is planned before any work.
    """
    options = renamed_options({**options, "sources": sources, "first_tokens": first_tokens}, "ngrams")
    sources, first_tokens = options.pop("sources"), options.pop("first_tokens")  # type: ignore[assignment]
    unknown = sorted(set(options) - TABLE_OPTIONS)
    if unknown:
        raise TypeError(f"ngrams() got unknown option(s) {unknown}; it takes {sorted(TABLE_OPTIONS)}")
    prog = _program(model_or_program, None)
    ids = _keyword_ids(keywords, tokenizer) if keywords is not None else None
    spec = path.name if isinstance(path, PathSpec) else path
    run = {k: options.pop(k) for k in list(options) if k in RUN_OPTIONS}
    tables = TableSet(prog, [spec], tokenizer=tokenizer, convention=convention, sources=sources,  # type: ignore[list-item]
                      contexts=options.pop("contexts", None), first_tokens=first_tokens,  # type: ignore[arg-type]
                      top=top, rank=rank, keywords=ids, **options)
    if not tables.ready:  # model passes come first: refuse what is past the limit before them
        check_plan(tables.plans(), run.get("max_seconds", DEFAULT_MAX_SECONDS),  # type: ignore[arg-type]
                   "max_seconds (None: no limit)")
    return tables.table(0, **run)


TABLE_OPTIONS = frozenset({"order", "contexts", "row_top", "last_top", "normalise", "chunk"}) | RUN_OPTIONS


def explain(model_or_program: nn.Module | ResidualProgram, input_ids_or_text: torch.Tensor | str,
            target: int | str | None = None, contrast: int | str | None = None, position: int = -1, *,
            tokenizer: object = None, granularity: str = "head", method: str = "frozen",
            budget: int = DEFAULT_BUDGET, goal: float | None = DEFAULT_GOAL, max_seconds: float = 60.0,
            order: int = 0, max_length: int = 2) -> PathAttribution:
    """Which paths make the model predict ``target`` at ``position``: the target's logit (or the
    logit difference ``target − contrast``) decomposed exactly into input-to-output paths over
    attention heads and MLPs (:mod:`jetgraph.applications.explain`).

    ``target``/``contrast``: a token id or a string of exactly one token (``" Paris"``); default
    target: the model's own top token. ``granularity``: ``"head"`` (default), ``"sublayer"`` or
    ``"block"``. ``method``: ``"frozen"`` (the best-first search of the frozen network, stopped
    at ``goal`` of the value, ``budget`` expansions or ``max_seconds``) or ``"jet"`` (every path
    of at most ``max_length`` units of the order-``order`` jet expansion). The parts are checked
    to add up to the model's own value; ``result.table()`` prints the ranked paths.
    """
    check_explain_options(method, budget, goal, max_seconds, order, max_length)
    check_granularity(granularity)
    prog = _program(model_or_program, None)
    ids = _input_ids(prog, input_ids_or_text, tokenizer)
    vocab = prog.decoder.unembedding.shape[0] if prog.decoder.unembedding is not None else None
    target_id = token_id(tokenizer, target, vocab, "target")
    contrast_id = token_id(tokenizer, contrast, vocab, "contrast")
    labels = {}
    if tokenizer is not None:
        wanted = set(ids[0].tolist()) | {t for t in (target_id, contrast_id) if t is not None}
        labels = {t: token_label(tokenizer, t) for t in wanted}
    result = explain_program(prog, ids, target_id, contrast_id, position, granularity=granularity,
                             method=method, budget=budget, goal=goal, max_seconds=max_seconds,
                             order=order, max_length=max_length, labels=labels)
    if tokenizer is not None and result.target not in labels:
        result.labels[result.target] = token_label(tokenizer, result.target)
    return result


def explain_attention(model_or_program: nn.Module | ResidualProgram, input_ids_or_text: torch.Tensor | str,
                      head: str, key: int, query: int = -1, *, tokenizer: object = None,
                      max_units: int = 1) -> ScoreAttribution:
    """Why ``head`` (``"attn1.h3"``) attends from ``query`` to ``key``: its pre-softmax score
    decomposed exactly into (query path, key path) pairs, with the norms held at this input
    (:mod:`jetgraph.applications.explain.attention`). It answers what a path attribution leaves
    in the held pattern: the query–key composition (an induction head matching the token a
    previous-token head wrote into the key). Paths of more than ``max_units`` units are summed
    into ``rest``; the pairs are checked to add up to the model's score."""
    prog = _program(model_or_program, None)
    ids = _input_ids(prog, input_ids_or_text, tokenizer)
    seq = ids.shape[1]
    for name, value in (("query", query), ("key", key)):
        if not -seq <= value < seq:
            raise ValueError(f"{name} position {value} is past the input of {seq} token(s) "
                             f"(give -{seq}..{seq - 1})")
    query, key = query % seq, key % seq
    if key > query:
        raise ValueError(f"key {key} is after query {query}: a head attends only to positions at or "
                         "before its query")
    # the network's own target is not used: a score attribution reads the stream, not the logits
    network = FrozenNetwork(prog.at("head"), ids, query, lambda row: row[..., 0])
    result = attention_score_attribution(network, head, query, key, max_units=max_units)
    if tokenizer is not None:
        result.tokens = [token_label(tokenizer, t) for t in ids[0].tolist()]
    return result


def _program(model_or_program: nn.Module | ResidualProgram, granularity: str | None) -> ResidualProgram:
    if isinstance(model_or_program, ResidualProgram):
        return model_or_program
    if isinstance(model_or_program, nn.Module):
        return capture(model_or_program, granularity=granularity or DEFAULT_GRANULARITY)
    raise TypeError(f"expected a model (torch.nn.Module) or a ResidualProgram, got "
                    f"{type(model_or_program).__name__}")


def _input_ids(prog: ResidualProgram, value: torch.Tensor | str, tokenizer: object) -> torch.Tensor:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError("a text input needs its tokenizer: pass tokenizer= (or give input ids)")
        if not value.strip():
            raise ValueError("the text is empty: give at least one token of input")
        value = tokenizer(value, return_tensors="pt").input_ids  # the tokenizer's own BOS rules
    ids = as_input_ids(value)
    vocab = prog.decoder.unembedding.shape[0] if prog.decoder.unembedding is not None else None
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: "
                         "is the tokenizer the model's own?")
    return ids.to(prog.decoder.unembedding.device if vocab is not None else ids.device)


def _keyword_ids(keywords: str | Sequence[str] | Sequence[int], tokenizer: object) -> list[int]:
    if isinstance(keywords, str):
        keywords = load_keywords(keywords)
    keywords = list(keywords)
    if all(isinstance(k, int) for k in keywords):
        return keywords  # type: ignore[return-value]
    if tokenizer is None:
        raise ValueError("keyword words need the tokenizer to find their token ids: pass tokenizer=")
    return keyword_ids(tokenizer, [str(k) for k in keywords])
