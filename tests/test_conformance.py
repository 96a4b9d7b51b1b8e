"""The conformance matrix (issue 27): "a feature works when it works on a model you did not build it on".

Every public entry point and CLI command × every family of :mod:`jetgraph.capture.conformance_zoo`
× {eager, lazy, bf16}, each cell checked against a computation that does not go through the code
under test: the Hugging Face model run directly (eager attention), a float64 oracle (nested
``torch.func.jvp`` on a float64 copy of the unit's graph; central differences where jvp is known
to be blind), the units composed by hand, or the library call a command wraps. Cells are named
``feature-family-mode``. The checks are plain functions (:data:`CHECKS`) so that
``benchmarks/conformance.py`` runs the same matrix on TinyStories and SmolLM2; docs/conformance.md
describes every cell.

Modes: ``eager`` = ``jetgraph.load_model(folder)`` (float32); ``lazy`` = ``jetgraph.load_lazy(folder)``
(weights read from safetensors while needed), against the same float32 references; ``bf16`` =
``jetgraph.load_model(folder, dtype=torch.bfloat16)`` against the Hugging Face model in bf16.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.func import jvp

import jetgraph
from jetgraph.capture.conformance_zoo import FAMILIES, Family, build_tokenizer, save_family
from jetgraph.cli import main

MODES = ("eager", "lazy", "bf16")
DTYPES = {"eager": torch.float32, "lazy": torch.float32, "bf16": torch.bfloat16}
# Tolerances, relative to the largest magnitude of the reference (docs/precision.md): float32 logits
# keep capture's own 1e-4; bf16 logits 8 machine epsilons (8 · 2^-7), as capture's self-check.
LOGITS = {torch.float32: 1e-4, torch.bfloat16: 8 * 2.0**-7}
# Taylor coefficients against the float64 oracle, relative norm per coefficient: float32 arithmetic
# (measured ≤ 3e-7 on the zoo) and bf16 arithmetic on bf16 weights (measured ≤ 6e-3).
COEFFICIENTS = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
# Probabilities of a read-out row against the Hugging Face model (absolute; measured ≤ 5e-9 in both).
PROBS = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
PLACEHOLDER = re.compile(r"^(<unused\d+>|<0x[0-9A-Fa-f]{2}>)$")  # unused and byte tokens, by their strings
TEXT = "the capital of france is a once upon time there was little"  # 12 words: longer than any window
SHORT_TEXT = "she liked to play outside"


class NotApplicable(Exception):
    """The cell is structurally not applicable (the reason says why): a skip, not a failure."""


# --------------------------------------------------------------------------------- subjects
@dataclass(eq=False)
class Subject:
    """One model of the matrix: a folder (config, safetensors, tokenizer), its texts, and its
    references and programs per mode, each built once.

    ``source`` is what ``jetgraph.load_model`` and the command line take (a folder, or
    ``"smollm2"``); ``folder`` is the saved folder ``load_lazy`` reads; ``parallel``: attention and
    MLP read the same state (the path count is 3^L per source, not 4^L)."""

    name: str
    source: str
    folder: Path
    text: str = TEXT
    short_text: str = SHORT_TEXT
    family: Family | None = None
    parallel: bool = False
    _tokenizer: object = None
    _references: dict = field(default_factory=dict)
    _programs: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)  # reference computations shared by cells

    def cli_model(self, mode: str) -> str:
        """What the command line is given: the folder when read lazily, else :attr:`source`."""
        return str(self.folder) if mode == "lazy" else self.source

    @property
    def tokenizer(self) -> object:
        if self._tokenizer is None:
            from jetgraph.capture.loading import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.folder))
        return self._tokenizer

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])

    @property
    def ids(self) -> torch.Tensor:
        """The test input, built the way the tokenizer builds text (its BOS included)."""
        return self.encode(self.text)

    def reference(self, mode: str) -> torch.nn.Module:
        """The Hugging Face model in the mode's dtype, eager attention: the independent reference."""
        dtype = DTYPES[mode]
        if dtype not in self._references:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.folder, dtype=dtype, attn_implementation="eager")
            self._references[dtype] = model.eval()
        return self._references[dtype]

    def program(self, mode: str) -> jetgraph.ResidualProgram:
        """The program of the mode's model, captured once (block granularity) on :attr:`ids`; a
        failure to load or capture is kept and raised again for every cell that needs it."""
        if mode not in self._programs:
            try:
                if mode == "lazy":
                    model = jetgraph.load_lazy(self.folder)
                else:
                    model, _ = jetgraph.load_model(self.source, dtype=DTYPES[mode])
                self._programs[mode] = jetgraph.capture(model, self.ids)
            except jetgraph.JetgraphError as exc:
                self._programs[mode] = exc
        program = self._programs[mode]
        if isinstance(program, Exception):
            raise program
        return program

    def release(self) -> None:
        """Drop the programs, references and cached computations (before the next model)."""
        self._programs.clear()
        self._references.clear()
        self._cache.clear()


class Zoo:
    """The conformance zoo, saved on first use under ``root`` (one folder per family)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.subjects: dict[str, Subject] = {}

    def __getitem__(self, name: str) -> Subject:
        if name not in self.subjects:
            family = FAMILIES[name]
            folder = save_family(family, self.root / name)
            subject = Subject(name, str(folder), folder, family=family, parallel=family.parallel)
            built = build_tokenizer(family)(TEXT)["input_ids"]
            assert subject.tokenizer(TEXT)["input_ids"] == built, f"{name}: saved tokenizer differs"
            self.subjects[name] = subject
        return self.subjects[name]


# --------------------------------------------------------------------------------- helpers
def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max(1, max |expected|), in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def _check(error: float, tolerance: float, what: str) -> float:
    assert error <= tolerance, f"{what}: error {error:.3g} > tolerance {tolerance:.3g}"
    return error


@torch.no_grad()
def _hf_logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model's final norm, by its usual names (a test-side adapter: the reference
    knows architectures; jetgraph does not)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise NotApplicable(f"no final norm found on {type(base).__name__}")


@torch.no_grad()
def _decode_by_hand(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The Hugging Face model's own readout of a stream state: lm_head(final_norm(h)), the
    hyper-connection streams [..., n, d] collapsed first by the model's own head (``hc_head``)."""
    head = getattr(model.base_model, "hc_head", None)
    if head is not None:  # [..., n, d] -> [..., d]: the head reads [batch, seq, n, d]
        lead, dtype = h.shape[:-2], h.dtype
        h = head(h.reshape(-1, 1, *h.shape[-2:]).to(next(head.parameters()).dtype))
        h = h.reshape(*lead, h.shape[-1]).to(dtype)
    return model.get_output_embeddings()(_final_norm(model)(h))


@torch.no_grad()
def _embedding(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The token embedding E in the stream's shape (Gemma's scale included: it is part of its
    embedding module; with ``hc_mult`` hyper-connection streams, E copied into each, as the
    models' own forward does)."""
    embedded = model.get_input_embeddings()(ids)
    streams = getattr(model.config, "hc_mult", None)
    if streams:
        embedded = embedded.unsqueeze(-2).expand(*embedded.shape[:-1], streams, embedded.shape[-1])
    return embedded


def _as_stream(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A Hugging Face hidden state in the program's stream shape (the embedding of a
    hyper-connected model is recorded before it is copied into its streams)."""
    return value.unsqueeze(-2).expand_as(like) if value.dim() < like.dim() else value


def _float64(function: jetgraph.ResidualUnit | jetgraph.Decoder, side: dict[str, torch.Tensor]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float64 copy of a unit's (or the decoder's) graph: weights, constants and every dtype the
    graph names (a softmax upcast to float32, a cast back to bf16) made float64. The oracle's
    function: the same computation, exact to float64."""
    graph_module = copy.deepcopy(function.graph_module).to(torch.float64)
    for name, value in list(vars(graph_module).items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(graph_module, name, value.double())

    def widen(a: object) -> object:
        return torch.float64 if isinstance(a, torch.dtype) and a.is_floating_point else a

    for node in graph_module.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, widen)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, widen)
        if node.target is torch.ops.aten._grouped_mm.default:  # its kernels take no float64
            node.target = _grouped_mm_by_group
    graph_module.recompile()
    values = [side[n].double() if side[n].is_floating_point() else side[n] for n in function.side_inputs]
    return lambda h: graph_module(h, *values)


def _grouped_mm_by_group(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """aten._grouped_mm (MoE experts in bf16) written out for the oracle: rows offs[g-1]:offs[g] of
    ``a`` times ``b[g]``, one matmul per group (any dtype; torch.func.jvp sees through it)."""
    assert a.dim() == 2 and b.dim() == 3 and offs is not None and bias is None, "the MoE experts' form"
    bounds = [0, *offs.tolist()]
    out = torch.cat([a[bounds[g]:bounds[g + 1]] @ b[g] for g in range(b.shape[0])])
    return out if out_dtype is None else out.to(out_dtype)


def _jvp_blind(function: jetgraph.ResidualUnit) -> bool:
    """Whether the graph holds another library's custom op (transformers' grouped_mm_fallback,
    the MoE experts): torch.func.jvp through it returns a zero tangent (docs/architectures.md)."""
    return any(node.op == "call_function" and "transformers" in str(node.target)
               for node in function.graph_module.graph.nodes)


def _coefficients(f: Callable, c: torch.Tensor, v: torch.Tensor, order: int, differences: bool
                  ) -> list[torch.Tensor]:
    """[D^j f(c)[v^j] / j!, j ≤ order ≤ 2] in float64: nested torch.func.jvp, or central
    differences (step 1e-4: truncation and rounding both ≈ 1e-8) where jvp is blind."""
    if not differences:
        functions = [f]
        for _ in range(order):
            previous = functions[-1]
            functions.append(lambda x, previous=previous: jvp(previous, (x,), (v,))[1])
        return [functions[j](c) / math.factorial(j) for j in range(order + 1)]
    if order > 2:
        raise ValueError("central differences here give orders ≤ 2")
    t = 1e-4
    plus, zero, minus = f(c + t * v), f(c), f(c - t * v)
    return [zero, (plus - minus) / (2 * t), (plus - 2 * zero + minus) / (2 * t * t)][: order + 1]


def _prefix(subject: Subject) -> list[int]:
    """The tokens the tokenizer puts before a text: the ids with special tokens, less the ids
    without them (which must end them)."""
    tok = subject.tokenizer
    with_special = list(tok(subject.text)["input_ids"])
    plain = list(tok(subject.text, add_special_tokens=False)["input_ids"])
    assert with_special[len(with_special) - len(plain):] == plain, (with_special, plain)
    prefix = with_special[: len(with_special) - len(plain)]
    if subject.family is not None:  # the zoo's tokenizers are built to add BOS exactly when they say
        assert prefix == ([tok.bos_token_id] if subject.family.bos else []), prefix
    return prefix


def _excluded(subject: Subject) -> set[int]:
    """Special, unused and byte tokens: never rows of a table chosen by the model."""
    tok = subject.tokenizer
    return set(tok.all_special_ids) | {i for t, i in tok.get_vocab().items() if PLACEHOLDER.match(t)}


@torch.no_grad()
def _last_log_probs(model: torch.nn.Module, contexts: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log p(next | context) of the Hugging Face model at each context's last position, float64."""
    parts = [_hf_logits(model, contexts[i:i + chunk], logits_to_keep=1)[:, -1].double().log_softmax(-1)
             for i in range(0, len(contexts), chunk)]
    return torch.cat(parts)


def _sample(vocab: int) -> torch.Tensor:
    """The documented sample the model's mean prediction is taken over (docs/readouts.md): every
    token up to 4,096, else 4,096 evenly spaced ids."""
    if vocab <= 4096:
        return torch.arange(vocab)
    return torch.linspace(0, vocab - 1, 4096).round().long().unique()


@torch.no_grad()
def _hf_mean(subject: Subject, mode: str) -> torch.Tensor:
    """The Hugging Face model's mean next-token distribution after the prefix, over the documented
    sample of first tokens [V] (once per subject and mode)."""
    if ("mean", mode) not in subject._cache:
        model = subject.reference(mode)
        prefix = torch.tensor(_prefix(subject), dtype=torch.long)
        sample = _sample(model.get_output_embeddings().weight.shape[0]).view(-1, 1)
        contexts = torch.cat([prefix.expand(len(sample), -1), sample], 1)
        subject._cache["mean", mode] = _last_log_probs(model, contexts).exp().mean(0)
    return subject._cache["mean", mode].clone()


@torch.no_grad()
def _hf_readout(subject: Subject, mode: str, rows: torch.Tensor, first_tokens: int = 16) -> torch.Tensor:
    """The default read-out computed from the Hugging Face model alone: log-probs [rows, V] of each
    row read the way the tokenizer builds text. With a prefix (BOS): row b = p(· | BOS b). Without
    one: the mixture Σ_a w_a p(· | a b) over the 16 tokens a of the model's mean one-token
    prediction (:func:`_hf_mean`), w renormalised."""
    model = subject.reference(mode)
    prefix = torch.tensor(_prefix(subject), dtype=torch.long)
    rows = rows.view(-1, 1)
    if len(prefix):
        return _last_log_probs(model, torch.cat([prefix.expand(len(rows), -1), rows], 1))
    weights, first = _hf_mean(subject, mode).topk(first_tokens)
    weights = weights / weights.sum()
    contexts = torch.cat([first.repeat(len(rows)).view(-1, 1), rows.repeat_interleave(first_tokens, 0)], 1)
    probs = _last_log_probs(model, contexts).exp().view(len(rows), first_tokens, -1)
    return (weights.view(1, -1, 1) * probs).sum(1).log()


def _ordinary_rows(subject: Subject, count: int) -> torch.Tensor:
    vocab = subject.reference("eager").get_output_embeddings().weight.shape[0]
    excluded = _excluded(subject)
    picks = torch.linspace(0, vocab - 1, 4 * count).round().long().unique().tolist()
    return torch.tensor([t for t in picks if t not in excluded][:count])


# --------------------------------------------------------------------------------- library cells
def check_capture(subject: Subject, mode: str, tmp: Path) -> float:
    """Program logits vs the Hugging Face model (eager attention) on the test text; lazy also vs
    the eager program."""
    ids, dtype = subject.ids, DTYPES[mode]
    prog = subject.program(mode)
    with torch.no_grad():
        logits = prog(ids)
    assert logits.dtype == dtype, logits.dtype
    error = _check(_relative(logits, _hf_logits(subject.reference(mode), ids)), LOGITS[dtype],
                   f"{mode} program vs the Hugging Face model")
    if mode == "lazy":
        with torch.no_grad():
            eager = subject.program("eager")(ids)
        error = max(error, _check(_relative(logits, eager), LOGITS[dtype], "lazy vs eager program"))
    return error


def check_padding(subject: Subject, mode: str, tmp: Path) -> float:
    """A left-padded batch (two prompts, an attention mask): each row's real positions equal the
    Hugging Face model run on that prompt alone."""
    prog, dtype = subject.program(mode), DTYPES[mode]
    long, short = subject.ids[0], subject.encode(subject.short_text)[0]
    pad = subject.tokenizer.pad_token_id if subject.tokenizer.pad_token_id is not None else 0
    ids = torch.full((2, len(long)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long, 1
    ids[1, len(long) - len(short):], mask[1, len(long) - len(short):] = short, 1
    with torch.no_grad():
        logits = prog(ids, attention_mask=mask)
    model = subject.reference(mode)
    errors = [_relative(logits[0], _hf_logits(model, long[None])[0]),
              _relative(logits[1, len(long) - len(short):], _hf_logits(model, short[None])[0])]
    return _check(max(errors), LOGITS[dtype], f"{mode} left-padded rows vs each prompt alone")


def _units_under_test(prog: jetgraph.ResidualProgram) -> list[jetgraph.ResidualUnit]:
    """The first attention unit and the last MLP unit of the sublayer view."""
    sub = prog.at("sublayer")
    attention = next(u for u in sub.units if u.kind == "attn")
    mlp = [u for u in sub.units if u.kind == "mlp"][-1]
    return [attention, mlp]


def check_jet(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph.jet`` of order 2 of the first attention and the last MLP unit, centred at the
    token embedding E (from the Hugging Face model) and evaluated at the stream state the unit
    reads, vs the float64 oracle on the materialised centre (nested jvp; central differences for
    MoE units, where jvp is blind)."""
    prog, dtype = subject.program(mode), DTYPES[mode]
    ids = subject.ids
    sub = prog.at("sublayer")
    states, side = sub.stream_with_side_inputs(ids)
    centre = _embedding(subject.reference(mode), ids)
    worst = 0.0
    for unit in _units_under_test(prog):
        h = states[unit.reads].detach()
        with prog.resident([unit]), torch.no_grad():
            jet = jetgraph.jet(unit, centre, h, order=2, side=side)
            oracle_f = _float64(unit, side)
        with torch.no_grad() if _jvp_blind(unit) else contextlib.nullcontext():
            oracle = _coefficients(oracle_f, centre.double(), (h - centre).double(), 2, _jvp_blind(unit))
        for k in range(3):
            got = jet.coefficients[k].double()
            error = ((got - oracle[k]).norm() / oracle[k].norm().clamp_min(1e-30)).item()
            worst = max(worst, _check(error, COEFFICIENTS[dtype], f"{unit.name} coefficient {k}"))
    return worst


def check_expand(subject: Subject, mode: str, tmp: Path) -> float:
    """The order-1 path term ``E→MLP_last^1→U`` of ``expand_paths`` vs the units composed by hand:
    decoder(D mlp(E)[h − E]), h the state the MLP reads, in float64."""
    prog, dtype = subject.program(mode), DTYPES[mode]
    ids = subject.ids
    sub = prog.at("sublayer")
    mlp = _units_under_test(prog)[1]
    expansion = jetgraph.expand_paths(sub, order=1, paths=["E→MLP_last^1→U"]).expansion()
    (name,) = [t.name for t in expansion.terms]
    assert name == f"embed.token→{mlp.name}^1→unembed", name
    with torch.no_grad():  # a lazy program's evaluation holds each unit's weights while its jet runs
        value = expansion.evaluate(ids).terms[name]
    states, side = sub.stream_with_side_inputs(ids)
    centre = _embedding(subject.reference(mode), ids).double()
    with prog.resident([mlp]):
        f, decoder = _float64(mlp, side), _float64(prog.decoder, side)
    h = states[mlp.reads].double()
    with torch.no_grad() if _jvp_blind(mlp) else contextlib.nullcontext():
        derivative = _coefficients(f, centre, h - centre, 1, _jvp_blind(mlp))[1]
    with torch.no_grad():
        expected = decoder(derivative.detach())
    return _check(_relative(value, expected), LOGITS[dtype], f"{name} vs decoder(D mlp(E)[h − E])")


def check_lens(subject: Subject, mode: str, tmp: Path) -> float:
    """The order-0 lens at every block state vs the Hugging Face model: lm_head(norm(hidden_states[ℓ]))
    for ℓ < L, its logits at h_L; and the program's states h_ℓ vs hidden_states[ℓ] (ℓ < L: the
    last entry is normed)."""
    prog, dtype = subject.program(mode).at("block"), DTYPES[mode]  # a state per layer, as Hugging Face's
    ids = subject.ids
    model = subject.reference(mode)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        states = prog.stream(ids)
    lens = jetgraph.lens(prog, ids, orders=(0,))[0]
    layers = len(prog.units)
    assert len(states) == len(out.hidden_states) == layers + 1 == lens.logits.shape[0], \
        (len(states), len(out.hidden_states))
    hidden = [_as_stream(out.hidden_states[ell], states[ell]) for ell in range(layers)]
    errors = [_relative(states[ell], hidden[ell]) for ell in range(layers)]
    errors += [_relative(lens.logits[ell], _decode_by_hand(model, hidden[ell])) for ell in range(layers)]
    errors.append(_relative(lens.logits[layers], out.logits))
    return _check(max(errors), LOGITS[dtype], "lens / states vs the Hugging Face model")


def check_lens_rivals(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph.lenses.jacobian`` and ``jetgraph.lenses.ahead`` (order 1, one state on) at the
    embedding h0 of the block view, vs the float64 oracle: Dec(D R(h0)[h0]) with R the blocks
    composed by hand from float64 copies (nested jvp; central differences where a unit is jvp-blind),
    and Dec(h0) + D Dec(h0)[h1 − h0] (relative norm per lens, the coefficients' tolerance)."""
    prog, dtype, ids = subject.program(mode).at("block"), DTYPES[mode], subject.ids
    jacobian = jetgraph.lenses.jacobian(prog, ids, layers=[0])
    ahead = jetgraph.lenses.ahead(prog, ids, order=1, ahead=1, layers=[0])
    states, side = prog.stream_with_side_inputs(ids)
    with prog.resident(prog.units):
        blocks = [_float64(unit, side) for unit in prog.units]
        decoder = _float64(prog.decoder, side)
    blind = any(_jvp_blind(unit) for unit in prog.units)

    def rest(h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = h + block(h)
        return h

    h0, h1 = states[0].detach().double(), states[1].detach().double()
    with torch.no_grad() if blind else contextlib.nullcontext():
        transported = _coefficients(rest, h0, h0, 1, blind)[1]
    with torch.no_grad():
        expected_jacobian = decoder(transported)
    expected_ahead = sum(_coefficients(decoder, h0, h1 - h0, 1, False))
    errors = [((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
              for got, want in ((jacobian.logits[0], expected_jacobian), (ahead.logits[0], expected_ahead))]
    return _check(max(errors), COEFFICIENTS[dtype], "Jacobian / ahead lens vs the float64 oracle")


def check_explain(subject: Subject, mode: str, tmp: Path) -> float:
    """``explain_program`` at head granularity: its value vs the Hugging Face model's logit; the
    head view's last state, decoded by the model's own final norm and lm_head, vs its logits (the
    heads found in this model sum to its attention); and the attribution adds up (checked inside,
    ``DecompositionError`` otherwise)."""
    from jetgraph.applications.explain import explain_program

    prog, dtype, ids = subject.program(mode), DTYPES[mode], subject.ids
    model = subject.reference(mode)
    with torch.no_grad():
        logits = _hf_logits(model, ids)[0, -1]
    target = int(logits.argmax())
    try:
        with torch.no_grad():
            heads = prog.at("head").stream(ids)[-1]
    except ValueError as error:  # a norm after the output projection: the update is not a sum of heads
        assert "affine output map" in str(error), error
        result = explain_program(prog, ids, target, budget=40, granularity="sublayer")
        return _check(abs(result.value - float(logits[target])) / max(1.0, float(logits.abs().max())),
                      LOGITS[dtype], "explain value (sublayer: heads refused) vs the Hugging Face model")
    result = explain_program(prog, ids, target, budget=40)
    errors = [abs(result.value - float(logits[target])) / max(1.0, float(logits.abs().max())),
              _relative(_decode_by_hand(model, heads)[0, -1], logits)]
    assert any(len(p.units) and ".h" in p.units[0] for p in result.paths + result.groups), "no head on a path"
    return _check(max(errors), LOGITS[dtype], "explain value / head view vs the Hugging Face model")


def check_explain_attention(subject: Subject, mode: str, tmp: Path) -> float:
    """``explain_attention`` on the last layer's first head, last query, first key: the
    attention weight it reports vs the Hugging Face model's own eager pattern, and the pairs add
    up to the real score (checked inside); a model whose heads cannot be split is refused."""
    prog, dtype, ids = subject.program(mode), DTYPES[mode], subject.ids
    layers = sum(u.kind == "attn" for u in prog.at("sublayer").units)
    head = f"attn{layers - 1}.h0"
    try:
        result = jetgraph.explain_attention(prog, ids, head, key=0)
    except ValueError as error:
        assert "affine output map" in str(error) or "softmax" in str(error), error
        return 0.0
    with torch.no_grad():
        patterns = subject.reference(mode)(input_ids=ids, use_cache=False, output_attentions=True).attentions
    expected = float(patterns[-1][0, 0, -1, 0])
    assert result.key == 0 and result.query == ids.shape[1] - 1
    return _check(abs(result.pattern - expected), LOGITS[dtype],
                  "explain_attention pattern vs the Hugging Face model's eager attention")


def check_readout(subject: Subject, mode: str, tmp: Path) -> float:
    """``RowReader`` (the default read-out, ``tokenizer=``) rows vs the Hugging Face model run on
    contexts built the way the tokenizer builds text (:func:`_hf_readout`)."""
    from jetgraph.applications.ngrams.readout import RowReader

    prog, dtype = subject.program(mode), DTYPES[mode]
    rows = _ordinary_rows(subject, 8)
    reader = RowReader(prog, tokenizer=subject.tokenizer)
    got = reader(rows)
    expected = _hf_readout(subject, mode, rows)
    return _check((got.exp() - expected.exp()).abs().max().item(), PROBS[dtype], "read-out rows vs the model")


FIRST, TOP = 20, 10


def _library_table(subject: Subject, mode: str) -> object:
    """``jetgraph.ngrams(prog, tokenizer=tok, sources=20, top=10)``: the default read-out's table, once
    per subject and mode (the ngrams cell and the CLI's cell compare with it)."""
    if ("ngrams", mode) not in subject._cache:
        subject._cache["ngrams", mode] = jetgraph.ngrams(subject.program(mode), tokenizer=subject.tokenizer,
                                                         sources=FIRST, top=TOP, progress=False)
    return subject._cache["ngrams", mode]


def check_ngrams(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph.ngrams(prog, tokenizer=tok, sources=20)``: the rows are the 20 tokens the Hugging
    Face model predicts most (its mean prediction after the prefix) without special, unused and
    byte tokens; every top entry's probability is the model's on the context the tokenizer builds."""
    dtype = DTYPES[mode]
    table = _library_table(subject, mode)
    rows = [int(table.contexts[i][0]) for i in range(len(table.contexts))]
    assert not set(rows) & _excluded(subject), sorted(set(rows) & _excluded(subject))
    entries = table.entries()
    contexts = torch.tensor([int(e["context_ids"]) for e in entries])
    expected, mean = _hf_readout(subject, mode, contexts), _hf_mean(subject, mode)
    if subject.family is not None and subject.family.placeholders:  # the check bites: the model's own
        assert set(mean.topk(FIRST).indices.tolist()) & _excluded(subject)  # top rows hold placeholders
    mean[torch.tensor(sorted(_excluded(subject)))] = -1.0
    common = set(mean.topk(FIRST).indices.tolist())
    overlap = len(common & set(rows)) / FIRST
    assert overlap == 1.0 or (dtype == torch.bfloat16 and overlap >= 0.9), (sorted(common), rows)
    got = torch.tensor([e["prob"] for e in entries], dtype=torch.double)
    want = expected[torch.arange(len(entries)), torch.tensor([e["next_id"] for e in entries])].exp()
    return _check((got - want).abs().max().item(), PROBS[dtype], "table entries vs the model")


def check_path_table(subject: Subject, mode: str, tmp: Path) -> float:
    """The ``E→U`` table over the first 512 ids vs lm_head(norm(E)) computed by hand from the
    Hugging Face modules: the same top entries, logits and log-probabilities."""
    prog, dtype = subject.program(mode), DTYPES[mode]
    model = subject.reference(mode)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = torch.arange(min(vocab, 512))
    table = jetgraph.ngrams(prog, "E→U", sources=range(len(rows)), top=TOP, progress=False)
    by_hand = _decode_by_hand(model, _embedding(model, rows)).double()
    log_probs = by_hand.log_softmax(-1)
    entries = table.entries()
    got = torch.tensor([e["logit"] for e in entries], dtype=torch.double)
    pairs = [(int(e["context_ids"]), e["next_id"]) for e in entries]
    want = torch.stack([by_hand[r, n] for r, n in pairs])
    error = (got - want).abs().max().item() / by_hand.abs().max().clamp_min(1).item()
    _check(error, LOGITS[dtype], "E→U entry logits vs by hand")
    best = log_probs.flatten().topk(TOP).values
    got_lp = torch.tensor([e["log_prob"] for e in entries], dtype=torch.double)
    gap = (got_lp - best).abs().max().item() / by_hand.abs().max().clamp_min(1).item()
    return max(error, _check(gap, LOGITS[dtype], "E→U top log-probabilities vs by hand"))


def check_emit(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph.emit`` of the bigram paths E→U and E→MLP_last→U: each output equals the path's own
    value by hand (lm_head(norm(E)) from the Hugging Face modules; decoder(mlp(E)) composed from
    float64 copies of the units), and the emitted target the Hugging Face model's logits. In bf16
    the code is emitted without the target (``remainder=False``: the model's whole forward is
    most of the trace's time, and eager and lazy check it)."""
    prog, dtype = subject.program(mode), DTYPES[mode]
    ids = subject.ids
    sub = prog.at("sublayer")
    mlp = _units_under_test(prog)[1]
    expansion = jetgraph.expand_paths(sub, paths=["E→U", "E→MLP_last→U"]).expansion()
    remainder = mode != "bf16"
    module = jetgraph.emit(expansion, ids, remainder=remainder)  # lazy: weights read for the trace
    with torch.no_grad():
        out = module(ids)
    model = subject.reference(mode)
    if remainder:
        _check(_relative(out["target"], _hf_logits(model, ids)), LOGITS[dtype], "emitted target vs the model")
    else:
        assert "target" not in out and "remainder" not in out
    embedding = _embedding(model, ids)
    side = sub.side_inputs(ids)
    with prog.resident([mlp]):
        f, decoder = _float64(mlp, side), _float64(prog.decoder, side)
    with torch.no_grad():
        direct = _decode_by_hand(model, embedding)
        through = decoder(f(embedding.double()))
    errors = [_relative(out["embed.token→unembed"], direct),
              _relative(out[f"embed.token→{mlp.name}→unembed"], through)]
    return _check(max(errors), LOGITS[dtype], "emitted path outputs vs by hand")


# --------------------------------------------------------------------------------- CLI cells
FLAGS = {"eager": [], "lazy": ["--lazy"], "bf16": ["--dtype", "bfloat16"]}


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``jetgraph.cli.main(argv)`` with its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _ok(argv: list[str]) -> str:
    code, out, err = _run(argv)
    assert code == 0, f"jetgraph {' '.join(argv)} exited {code}: {err.strip()[-600:]}"
    return out


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_cli_capture(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph capture``: exit 0; the summary it writes is the library program's (sublayer view),
    and its logit errors are within the tolerance of the Hugging Face model's logits."""
    out = tmp / "summary.txt"
    _ok(["capture", subject.cli_model(mode), "--text", subject.text, "--out", str(out), *FLAGS[mode]])
    text = out.read_text()
    dtype = DTYPES[mode]
    assert subject.program(mode).at("sublayer").summary_table() in text
    scale = _hf_logits(subject.reference(mode), subject.ids).abs().max().clamp_min(1).item()
    errors = [float(v) / scale for v in re.findall(r"logits\(model, \w+ attention\)\| = (\S+)", text)]
    if mode == "lazy":
        assert not errors and "read lazily" in text, text
        return 0.0
    assert errors, text
    return _check(max(errors), LOGITS[dtype], "capture's printed logit error")


def check_cli_lens(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph lens --order 1 --csv``: exit 0; every CSV row equals the library's iterative lens
    (sublayer view) on the same text; order 0 at the last state is the model itself (cosine 1)."""
    from jetgraph.applications import iterative_lenses

    csv_path = tmp / "lens.csv"
    _ok(["lens", subject.cli_model(mode), subject.text, "--order", "1", "--csv", str(csv_path),
         "--out", str(tmp / "lens.png"), *FLAGS[mode]])
    rows = _csv_rows(csv_path)
    library = iterative_lenses(subject.program(mode).at("sublayer"), subject.ids, orders=(0, 1))
    expected = {(str(order), row["center"]): row
                for order, result in library.items() for row in result.table()}
    assert len(rows) == len(expected), (len(rows), len(expected))
    worst = 0.0
    for row in rows:
        want = expected[(row["order"], row["center"])]
        for metric in ("cosine", "top1"):
            worst = max(worst, abs(float(row[metric]) - float(want[metric])))
    last = [r for r in rows if r["order"] == "0"][-1]
    assert abs(float(last["cosine"]) - 1) < 1e-3, last
    return _check(worst, 1e-4 if DTYPES[mode] == torch.float32 else 1e-2, "lens CSV vs the library")


def check_cli_ngrams(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph ngrams --sources 20 --top 10``: exit 0; the CSV's entries are the library table's
    (``jetgraph.ngrams(prog, tokenizer=tok, sources=20)``) and their probabilities the Hugging Face
    model's on the contexts the tokenizer builds."""
    out = tmp / "table.csv"
    _ok(["ngrams", subject.cli_model(mode), "--sources", str(FIRST), "--top", str(TOP), "--out", str(out),
         *FLAGS[mode]])
    rows = _csv_rows(out)
    dtype = DTYPES[mode]
    library = [(e["context_ids"], e["next_id"]) for e in _library_table(subject, mode).entries()]
    written = [(r["context_ids"], int(r["next_id"])) for r in rows]
    if dtype == torch.float32:
        assert written == library, (written, library)
    else:  # bf16 ties reorder near the cut
        assert len(set(written) & set(library)) >= 0.8 * TOP, (written, library)
    contexts = torch.tensor([int(c) for c, _ in written])
    expected = _hf_readout(subject, mode, contexts)
    want = expected[torch.arange(len(rows)), torch.tensor([n for _, n in written])].exp()
    got = torch.tensor([float(r["prob"]) for r in rows], dtype=torch.double)
    return _check((got - want).abs().max().item(), PROBS[dtype], "ngrams CSV vs the model")


def check_cli_paths(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph paths``: exit 0; the count it prints is ``count_paths`` and the closed form from the
    config (sources · 4^L sequential, sources · 3^L parallel); the picture is written."""
    render = tmp / "paths.dot"
    out = _ok(["paths", subject.cli_model(mode), "--text", subject.text, "--render", str(render),
               *FLAGS[mode]])
    printed = int(re.search(r": ([\d,]+) paths at sublayer", out).group(1).replace(",", ""))
    prog = subject.program(mode)
    layers = subject.reference("eager").config.num_hidden_layers
    sources = len(prog.encoder.addend_names)
    closed = sources * (3 if subject.parallel else 4) ** layers
    assert printed == jetgraph.count_paths(prog, "sublayer", 0) == closed, (printed, closed)
    norms = [float(v) for v in re.findall(r"‖·‖ = (\S+?)\"", render.read_text())]
    assert norms and all(math.isfinite(n) for n in norms), norms  # every drawn term evaluated
    model = subject.reference(mode)
    direct = _decode_by_hand(model, _embedding(model, subject.ids)).double().norm().item()
    error = min(abs(n - direct) for n in norms) / direct  # E→U's term: ‖lm_head(norm(E))‖ by hand
    return _check(error, 6e-3 + LOGITS[DTYPES[mode]], "E→U's drawn norm (3 digits) vs by hand")


def check_cli_emit(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph emit --paths E→U E→MLP_last→U``: exit 0; the written module, imported and run, gives
    the library's path values (``Expansion.evaluate``), E→U equals lm_head(norm(E)) by hand, and
    its target the Hugging Face model's logits."""
    target = tmp / f"emitted_{subject.name}_{mode}.py"
    _ok(["emit", subject.cli_model(mode), "-o", str(target), "--text", subject.text, "--paths", "E→U",
         "E→MLP_last→U", *FLAGS[mode]])
    spec = importlib.util.spec_from_file_location(target.stem, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = subject.ids
    with torch.no_grad():
        written = module.load()(ids)
    sub = subject.program(mode).at("sublayer")
    expansion = jetgraph.expand_paths(sub, paths=["E→U", "E→MLP_last→U"]).expansion()
    with torch.no_grad():
        library = expansion.evaluate(ids).terms  # the reference evaluator: each path's own value
    names = [t.name for t in expansion.terms]
    assert set(names) <= set(written), (names, sorted(written))
    model = subject.reference(mode)
    errors = [_relative(written[n], library[n]) for n in names]
    errors.append(_relative(written["embed.token→unembed"], _decode_by_hand(model, _embedding(model, ids))))
    if "target" in written:  # the written file's own forward (lazy: its weights, not placeholders)
        errors.append(_relative(written["target"], _hf_logits(model, ids)))
    return _check(max(errors), LOGITS[DTYPES[mode]], "emitted module vs the library and by hand")


def _one_line(argv: list[str], code: int, fragment: str) -> None:
    got, _, err = _run(argv)
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("Loading weights")]
    assert got == code, f"jetgraph {' '.join(argv)} exited {got}, expected {code}: {err[-400:]}"
    assert "Traceback" not in err and len(lines) == 1 and fragment in lines[0], err[-600:]


def check_cli_errors(subject: Subject, mode: str, tmp: Path) -> float:
    """One bad input per command: exit 2 (usage) or 1 (error) with a one-line message."""
    source = subject.cli_model(mode)
    layers = subject.reference("eager").config.num_hidden_layers
    _one_line(["capture", source, "--text", "", *FLAGS[mode]], 2, "--text is empty")
    _one_line(["lens", source, "  ", *FLAGS[mode]], 2, "the text is empty")
    _one_line(["ngrams", source, "--paths", f"E→mlp{layers}→U", "--out", str(tmp / "t.csv"), *FLAGS[mode]],
              1, f"has {layers} layers")
    _one_line(["paths", source, "--paths", "E→conv0→U", "--render", str(tmp / "p.dot"), *FLAGS[mode]],
              1, "unknown unit 'conv0'")
    folder = tmp / "emitted.py"
    folder.mkdir()
    _one_line(["emit", source, "-o", str(folder), *FLAGS[mode]], 1, "is a folder")
    return 0.0


# ------------------------------------------------------------------ CLI analyses (roles … curves)
KEYWORDS = ("the", "capital")


def _analysis_flags(command: str, mode: str) -> list[str]:
    """The mode's flags for an analysis command; a command without them is not applicable."""
    options = {"masses": ("eager", "bf16"), "diff": ("eager", "bf16"), "curves": ("eager",),
               "sketch": MODES, "roles": MODES}[command]
    if mode not in options:
        raise NotApplicable(f"jetgraph {command} has no {' '.join(FLAGS[mode])} option")
    return FLAGS[mode]


def _sibling(subject: Subject, tmp: Path) -> Subject:
    """The same family with other random weights (seed 1): the second model of diff and curves."""
    if subject.family is None:
        raise NotApplicable("diff and curves need a second model of the same vocabulary (zoo families only)")
    folder = save_family(subject.family, tmp / f"{subject.name}-seed1", seed=1)
    return Subject(f"{subject.name}-seed1", str(folder), folder, subject.text, subject.short_text,
                   subject.family, subject.parallel)


def _small_vocabulary(subject: Subject) -> int:
    """V, where a full [V, V] reference table is affordable (V ≤ 4096); checked before the command runs."""
    vocab = subject.reference("eager").get_output_embeddings().weight.shape[0]
    if vocab > 4096:
        raise NotApplicable(f"a full [V, V] reference table at V = {vocab:,} is too large for this cell")
    return vocab


@torch.no_grad()
def _hf_table(subject: Subject, mode: str, chunk: int = 256) -> torch.Tensor:
    """The default read-out of every row from the Hugging Face model, probabilities [V, V] (V ≤ 4096)."""
    vocab = _small_vocabulary(subject)
    rows = torch.arange(vocab)
    return torch.cat([_hf_readout(subject, mode, rows[i:i + chunk]).exp() for i in range(0, vocab, chunk)])


def check_cli_masses(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph masses --keywords the,capital``: exit 0; the mass it writes is the mean over every
    source token b of Σ_k p(k | b, read the way the tokenizer builds text), from the Hugging Face model."""
    flags = _analysis_flags("masses", mode)
    _small_vocabulary(subject)
    out = tmp / "masses.csv"
    _ok(["masses", subject.source, "--keywords", ",".join(KEYWORDS), "--controls", "5", "--csv", str(out),
         "--out", str(tmp / "masses.png"), *flags])
    (row,) = _csv_rows(out)
    tok = subject.tokenizer  # the documented keyword ids: each word's first token that is not bare
    variants = [v for w in KEYWORDS for v in (w, " " + w)]  # white space, with and without a space
    encoded = [tok(v, add_special_tokens=False)["input_ids"] for v in variants]
    keywords = sorted({next(i for i in ids if tok.decode([i]).strip()) for ids in encoded})
    table = _hf_table(subject, mode)
    expected = table[:, keywords].sum(-1).mean().item()
    return _check(abs(float(row["mass"]) - expected) / expected, 1e-4 if mode != "bf16" else 3e-2,
                  "keyword mass vs the model")


def check_cli_diff(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph diff A B --top 3``: exit 0; every written p_A, p_B is the Hugging Face models' own
    read-out, and the first increase is the largest p_B − p_A over every (row, next) pair."""
    flags = _analysis_flags("diff", mode)
    _small_vocabulary(subject)
    other = _sibling(subject, tmp)
    out = tmp / "diff.csv"
    _ok(["diff", subject.source, other.source, "--top", "3", "--csv", str(out),
         "--out", str(tmp / "diff.png"), *flags])
    rows = _csv_rows(out)
    table_a, table_b = _hf_table(subject, mode), _hf_table(other, mode)
    errors = []
    for row in rows:
        context, token = int(row["context"]), int(row["next"])
        errors += [abs(float(row["p_a"]) - table_a[context, token].item()),
                   abs(float(row["p_b"]) - table_b[context, token].item())]
    first = next(r for r in rows if r["direction"] == "increase" and r["rank"] == "1")
    best = divmod(int((table_b - table_a).flatten().argmax()), table_a.shape[1])
    if mode != "bf16":
        assert (int(first["context"]), int(first["next"])) == best, (first, best)
    return _check(max(errors), PROBS[DTYPES[mode]], "diff probabilities vs the models")


def check_cli_curves(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph curves B A --top 10``: exit 0; the final checkpoint's top-k mass and the first's hit
    ratio equal the Hugging Face models' top-10 read-out entries."""
    _analysis_flags("curves", mode)
    _small_vocabulary(subject)
    other = _sibling(subject, tmp)
    out = tmp / "curves.csv"
    _ok(["curves", other.source, subject.source, "--top", "10", "--csv", str(out),
         "--out", str(tmp / "c.png")])
    first, final = _csv_rows(out)
    table_a, table_b = _hf_table(subject, mode), _hf_table(other, mode)
    top_a, top_b = table_a.flatten().topk(10), table_b.flatten().topk(10)
    hits = len(set(top_a.indices.tolist()) & set(top_b.indices.tolist())) / 10
    assert float(first["hit_ratio"]) == hits and float(final["hit_ratio"]) == 1.0, (first, final, hits)
    return _check(abs(float(final["top_k_mass"]) - top_a.values.sum().item()), 10 * PROBS[DTYPES[mode]],
                  "final top-k mass vs the model")


def _text_file(subject: Subject, tmp: Path, repeats: int) -> Path:
    path = tmp / "text.txt"
    path.write_text(" ".join([subject.text, subject.short_text] * repeats))
    return path


def check_cli_sketch(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph sketch --text FILE --trigram off``: exit 0 (a smoke cell: the sketch's tables are
    checked in tests/test_sketch.py); the uniform LM's perplexity is the vocabulary and the fitted
    interpolation weights sum to 1."""
    import json

    flags = _analysis_flags("sketch", mode)
    out = tmp / "sketch"
    _ok(["sketch", subject.cli_model(mode), "--text", str(_text_file(subject, tmp, 24)), "--length", "16",
         "--trigram", "off", "--out", str(out), *flags])
    perplexities = {r["lm"]: float(r["perplexity"]) for r in _csv_rows(out / "perplexities.csv")}
    vocab = subject.reference("eager").get_output_embeddings().weight.shape[0]
    assert perplexities["uniform"] == vocab, perplexities
    assert all(math.isfinite(v) for v in perplexities.values()), perplexities
    weights = json.loads((out / "sketch.json").read_text())["weights"]
    return _check(abs(sum(weights) - 1), 1e-6, "interpolation weights")


def check_cli_roles(subject: Subject, mode: str, tmp: Path) -> float:
    """``jetgraph roles --targets id:N --text FILE`` (N: the file's third token): exit 0 (a smoke cell:
    roles are checked in tests/test_analyses.py); the CSV ranks every MLP unit of the sublayer view,
    every score and ΔLogit finite."""
    flags = _analysis_flags("roles", mode)
    out = tmp / "roles.csv"
    text = _text_file(subject, tmp, 8)
    target = f"id:{subject.tokenizer(text.read_text(), add_special_tokens=False)['input_ids'][2]}"
    _ok(["roles", subject.cli_model(mode), "--targets", target, "--text", str(text),
         "--length", "16", "--pairs", "1", "--csv", str(out), "--out", str(tmp / "roles.png"), *flags])
    rows = _csv_rows(out)
    layers = subject.reference("eager").config.num_hidden_layers
    missing = {f"mlp{i}" for i in range(layers)} - {r["units"] for r in rows}
    assert not missing, (missing, rows[:3])
    numbers = {k: v for r in rows for k, v in r.items() if k.startswith(("score", "mean", "dlogit"))}
    assert all(math.isfinite(float(v)) for v in numbers.values()), rows[0]
    return 0.0


CHECKS: dict[str, Callable[[Subject, str, Path], float]] = {
    "capture": check_capture,
    "padding": check_padding,
    "jet": check_jet,
    "expand": check_expand,
    "lens": check_lens,
    "lens_rivals": check_lens_rivals,
    "explain": check_explain,
    "explain_attention": check_explain_attention,
    "readout": check_readout,
    "ngrams": check_ngrams,
    "path_table": check_path_table,
    "emit": check_emit,
    "cli_capture": check_cli_capture,
    "cli_lens": check_cli_lens,
    "cli_ngrams": check_cli_ngrams,
    "cli_paths": check_cli_paths,
    "cli_emit": check_cli_emit,
    "cli_errors": check_cli_errors,
    "cli_masses": check_cli_masses,
    "cli_diff": check_cli_diff,
    "cli_curves": check_cli_curves,
    "cli_sketch": check_cli_sketch,
    "cli_roles": check_cli_roles,
}
LIBRARY = ("capture", "padding", "jet", "expand", "lens", "lens_rivals", "explain", "explain_attention",
           "readout", "ngrams", "path_table", "emit")
CLI = ("cli_capture", "cli_lens", "cli_ngrams", "cli_paths", "cli_emit", "cli_errors")
ANALYSES = ("cli_masses", "cli_diff", "cli_curves", "cli_sketch", "cli_roles")

# ------------------------------------------------------------------------------- known failures
# Each is an xfail(strict=True) naming the bug; a fix turns the cell into an XPASS, which fails the
# run until the entry is removed. The six bugs this matrix found first (lazy loading of renamed
# checkpoints, MoE in bf16, emitted bf16 LayerNorm, and four lazy CLI commands) are fixed; the
# cells that found them are the regression tests (docs/conformance.md).
ROUTING_FLIP = "the bf16 router picks other experts than the float64 oracle's at one position"
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    # not a jet error, a check to fix: at the centre E the routed MoE unit's bf16 router picks other
    # experts than its float64 copy at position 0 (88% off there, ≤ 2.8% at the other positions),
    # so its value and terms differ by 17% / 13% overall; the check should compare the positions
    # whose routing agrees (eager and lazy float32 pass)
    ("jet", "hyper_connections", "bf16"): ROUTING_FLIP,
    ("expand", "hyper_connections", "bf16"): ROUTING_FLIP,
}


def known_failure(feature: str, family: str, mode: str) -> str | None:
    """The bug a cell fails on, or None."""
    return KNOWN_FAILURES.get((feature, family, mode))


# ------------------------------------------------------------------------------- the matrix
FEATURES = (*LIBRARY, *CLI, *ANALYSES)
# The CI-sized matrix (the whole suite; its eager column is in the fast tier): every library feature
# on every family in every mode, the CLI's bad inputs everywhere, capture and ngrams on every family,
# lens, paths and emit on two families (BOS and no BOS), masses, sketch and roles on one; the rest of
# the matrix is marked slow (and run by benchmarks/conformance.py).
FAST_CLI_FAMILIES = ("llama_bos", "gpt2")


def fast(feature: str, family: str, mode: str) -> bool:
    if feature in LIBRARY or feature == "cli_errors":
        return True
    if feature in ("cli_capture", "cli_ngrams") and mode == "eager":
        return True
    if feature in ANALYSES:  # diff and curves read two models: slow
        return family == "llama_bos" and mode == "eager" and feature not in ("cli_diff", "cli_curves")
    return family in FAST_CLI_FAMILIES and mode == "eager"


def cells(families=tuple(FAMILIES), features=FEATURES, modes=MODES) -> list[tuple[str, str, str]]:
    return [(feature, family, mode) for feature in features for family in families for mode in modes]


def in_fast_tier(feature: str, family: str, mode: str) -> bool:
    """The fast tier (``-m "not slow"``) holds the CI-sized matrix's eager column and the CLI's
    bad inputs in every mode; the lazy and bf16 columns of the library features run in the whole
    suite (each mode captures every family once more, and emit traces each model's forward)."""
    return fast(feature, family, mode) and (mode == "eager" or feature == "cli_errors")


def _param(cell: tuple[str, str, str]) -> object:
    reason = known_failure(*cell)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    if not fast(*cell):  # run with --full-matrix (and by benchmarks/conformance.py)
        marks += [pytest.mark.slow, pytest.mark.matrix_beyond_ci]
    elif not in_fast_tier(*cell):  # the whole suite and CI run it
        marks += [pytest.mark.slow]
    return pytest.param(*cell, id="-".join(cell), marks=marks)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("conformance_zoo"))


@pytest.mark.parametrize(("feature", "family", "mode"), [_param(c) for c in cells()])
def test_cell(zoo: Zoo, feature: str, family: str, mode: str, tmp_path: Path) -> None:
    try:
        CHECKS[feature](zoo[family], mode, tmp_path)
    except NotApplicable as reason:
        pytest.skip(str(reason))
