"""``explain``: a prediction's logit (or logit difference) decomposed into paths.

Two decompositions, both exact (their parts add up to the model's own value, checked on every
call):

* ``method="frozen"`` (default): the network with its nonlinear factors held at their values on
  this input (:mod:`jetgraph.taylor.frozen`) is affine in its sources, so every group of paths
  sharing a prefix has an exact total, and a best-first search
  (:mod:`jetgraph.applications.explain.search`) lists the paths that carry the most without
  enumerating the rest; the remainder is rounding.
* ``method="jet"``: the paper's construction — every path up to ``max_length`` units of the
  order-``order`` jet expansion (:func:`jetgraph.expand_paths`), each projected on the target;
  the remainder is the expansion's own. It enumerates, so its plan (the number of paths) is
  checked against ``budget`` first.
"""

from __future__ import annotations

import math
import time

import torch

from jetgraph.applications.explain.attribution import SUM_TOLERANCE, AttributedPath, PathAttribution
from jetgraph.applications.explain.network import FrozenNetwork, Source, frozen
from jetgraph.applications.explain.search import Found, PathSearch
from jetgraph.cost import Plan, estimate_seconds, gemm_rate
from jetgraph.ir import DECODER_NAME, ResidualProgram, as_input_ids, check_granularity
from jetgraph.passes import count_paths, expand_paths, parse_path
from jetgraph.precision import dtype_name

METHODS = ("frozen", "jet")
FREEZE_SECONDS = 0.02  # rewriting one unit's graph into its frozen maps, once per program (15 ms here)
FROZEN_BYTES_PER_NODE = 15e3  # a node of a frozen unit's two graphs with its code (SmolLM2: ≈ 12 kB)
EXPANSION_OPS = 50  # an expansion's bookkeeping (heap, sorting its children) in op dispatches
DEFAULT_BUDGET = 2000
DEFAULT_GOAL = 0.9


def check_explain_options(method: str = "frozen", budget: int = DEFAULT_BUDGET,
                          goal: float | None = DEFAULT_GOAL, max_seconds: float = 60.0, order: int = 0,
                          max_length: int = 2) -> None:
    """One-line ValueErrors for options that cannot work, before any model is touched."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"budget must be a positive number of expansions, got {budget!r}")
    if goal is not None and not 0 < goal <= 1:
        raise ValueError(f"goal must be a share in (0, 1] or None (no goal), got {goal!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}")
    if not isinstance(max_length, int) or max_length < 0:
        raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")


def explain_plan(prog: ResidualProgram, tokens: int, budget: int = DEFAULT_BUDGET,
                 granularity: str = "head") -> Plan:
    """An upper bound on the frozen method's cost for ``tokens`` input tokens: one forward and
    one backward pass of the view (each unit of the head view runs its whole attention), then
    ``budget`` expansions, each one unit's frozen linear map and one product with every unit's
    gradient; memory for the held values, the gradients (float64), a vector per expansion and
    the frozen units' graphs (made once per program)."""
    view = prog.at(check_granularity(granularity))
    sublayers = max(len(view.sublayers), 1)
    per_unit = sum(u.num_parameters for u in view.sublayers) / sublayers
    units = len(view.units)  # at head granularity: finds the heads (cached for the explanation)
    vocab, hidden = view.decoder.unembedding.shape if view.decoder.unembedding is not None else (1, 1)
    passes = 3 * 2.0 * tokens * (units * per_unit + vocab * hidden)
    expansions = budget * (2.0 * tokens * per_unit + 2.0 * units * tokens * hidden)
    dtype = view.decoder.unembedding.dtype if view.decoder.unembedding is not None else torch.float32
    mean_ops = sum(u.op_count for u in view.sublayers) / sublayers
    peak = (8.0 * tokens * hidden * (3 * units + budget) + 4.0 * units * tokens * (tokens * 16 + 4 * hidden)
            + FROZEN_BYTES_PER_NODE * 2 * units * mean_ops)
    ops = 3 * (units + 1) * mean_ops + budget * (mean_ops + EXPANSION_OPS)
    seconds = estimate_seconds(passes + expansions, overhead=0.5 + FREEZE_SECONDS * units, dtype=dtype,
                               ops=ops)
    return Plan(f"explain ({granularity} granularity, {units} units, {tokens} tokens)", budget,
                "expansions at most", passes + expansions, peak, seconds, gemm_rate(dtype))


def explain_program(prog: ResidualProgram, input_ids: torch.Tensor, target: int | None = None,
                    contrast: int | None = None, position: int = -1, *, granularity: str = "head",
                    method: str = "frozen", budget: int = DEFAULT_BUDGET, goal: float | None = DEFAULT_GOAL,
                    max_seconds: float = 60.0, order: int = 0, max_length: int = 2,
                    labels: dict[int, str] | None = None) -> PathAttribution:
    """The attribution of ``target``'s logit at ``position`` (minus ``contrast``'s) for one
    sequence of token ids. ``target=None``: the model's top token there."""
    check_explain_options(method, budget, goal, max_seconds, order, max_length)
    view = prog.at(check_granularity(granularity))
    ids = as_input_ids(input_ids)
    if ids.shape[0] != 1:
        raise ValueError(f"explain takes one sequence, got a batch of {ids.shape[0]}")
    seq = ids.shape[1]
    if not -seq <= position < seq:
        raise ValueError(f"position {position} is past the input of {seq} token(s) "
                         f"(give -{seq}..{seq - 1})")
    position %= seq
    vocab = int(prog.decoder.unembedding.shape[0]) if prog.decoder.unembedding is not None else None
    with torch.no_grad():
        logits = prog(ids)[0, position]
    if target is None:
        target = int(logits.argmax())
    if contrast is not None and contrast == target:
        raise ValueError(f"the contrast is the target (token {target}): logit(target) − logit(contrast) "
                         "would be 0; give a different contrast or none")
    for name, token in (("target", target), ("contrast", contrast)):
        if token is not None and vocab is not None and not 0 <= token < vocab:
            raise ValueError(f"{name} token id {token} is outside the vocabulary of {vocab}")

    def value_of(row: torch.Tensor) -> torch.Tensor:
        return row[..., target] - (row[..., contrast] if contrast is not None else 0)

    model_value = float(value_of(logits).double())
    dtype = next((p.dtype for p in prog.decoder.graph_module.parameters()), torch.float32)
    common = dict(tokens=ids[0].tolist(), position=position, target=target, contrast=contrast,
                  value=model_value, granularity=view.granularity, dtype=dtype_name(dtype),
                  labels=labels or {})
    working = working_dtype(view, dtype)
    common["working_dtype"] = dtype_name(working)
    tolerance = SUM_TOLERANCE.get(working, 1e-4)
    if method == "jet":
        result = _jet(view, ids, position, value_of, order, max_length, budget, common)
        result.check(tolerance, remainder_is_rounding=False)
        return result
    network = FrozenNetwork(view, ids, position, value_of)
    search = PathSearch(network, budget, max_seconds, goal)
    found = search.run()
    constant = network.decoder_constant()
    paths = [_attributed(network, ids, f) for f in found.paths]
    paths.append(AttributedPath(f"{DECODER_NAME}.const", None, None, (), (), constant))
    paths.sort(key=lambda p: -abs(p.contribution))
    groups = sorted((_attributed(network, ids, g) for g in found.groups), key=lambda g: -abs(g.contribution))
    explained = (math.fsum(p.contribution for p in paths) + math.fsum(g.contribution for g in groups)
                 + found.rest_total)
    result = PathAttribution(**common, method="frozen", paths=paths, groups=groups,
                             rest_total=found.rest_total, rest_mass=found.rest_mass,
                             rest_count=found.rest_count,
                             remainder=model_value - explained, expansions=found.expansions,
                             seconds=found.seconds, stopped=found.stopped)
    held = sorted({op for unit in view.units for op in frozen(unit).held})
    if held:
        result.notes.append("held at their values on this input (constants of the frozen map): "
                            + ", ".join(held))
    result.check(tolerance, remainder_is_rounding=True)
    return result


def working_dtype(view: ResidualProgram, dtype: torch.dtype) -> torch.dtype:
    """The least precise floating dtype the program computes in: a float64 Llama still takes its
    norms in float32 (its graph casts), so its decomposition is float32-exact there."""
    least = dtype
    for module in [view.decoder.graph_module, *(u.graph_module for u in view.sublayers[:2])]:
        for node in module.graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and \
                    torch.finfo(value.dtype).eps > torch.finfo(least).eps:
                least = value.dtype
    return least


def _attributed(network: FrozenNetwork, ids: torch.Tensor, found: Found) -> AttributedPath:
    source: Source = found.source
    names = tuple(network.units[i].name for i in found.units)
    if source.position is None:  # a unit's constant: the unit is where the path starts
        return AttributedPath(f"{source.name}.const", None, None, names, (0,) + (1,) * len(names),
                              found.total, found.ends)
    token = int(ids[0, source.position])
    return AttributedPath(source.name, source.position, token, names, (1,) * len(names), found.total,
                          found.ends)


def _jet(view: ResidualProgram, ids: torch.Tensor, position: int, value_of, order: int, max_length: int,
         budget: int, common: dict) -> PathAttribution:
    """The paper's decomposition: every path of at most ``max_length`` units of the order-``order``
    jet expansion, each projected on the target; the rest is the expansion's remainder."""
    start = time.perf_counter()
    expansion = expand_paths(view, order=order, max_length=max_length)
    planned = expansion.count()
    if planned > budget:
        raise ValueError(f"the jet decomposition has {planned:,} paths of at most {max_length} units at "
                         f"order {order}, over the budget of {budget:,}; raise the budget or lower "
                         f"max_length (all paths: {count_paths(view, order=order):,})")
    evaluated = expansion.expansion().evaluate(ids)
    paths = []
    for name, term in evaluated.terms.items():
        spec = parse_path(name)
        paths.append(AttributedPath(spec.source, None, None, tuple(spec.units), spec.degrees,
                                    float(value_of(term[0, position]).double()), name=name))
    paths.sort(key=lambda p: -abs(p.contribution))
    remainder = float(value_of(evaluated.remainder[0, position]).double())
    return PathAttribution(**common, method=f"jet (order {order}, ≤{max_length} units)", paths=paths,
                           groups=[], remainder=remainder, expansions=planned,
                           seconds=time.perf_counter() - start, stopped="every path up to max_length")


def token_id(tokenizer, value: int | str | None, vocab: int | None, what: str) -> int | None:
    """A target given as an id or a string of exactly one token (with its leading space)."""
    if value is None or isinstance(value, int):
        return value
    if tokenizer is None:
        raise ValueError(f"a {what} given as text needs the tokenizer (or give its token id)")
    pieces = tokenizer(value, add_special_tokens=False).input_ids
    if len(pieces) != 1:
        shown = [tokenizer.decode([p]) for p in pieces]
        raise ValueError(f"{what} {value!r} is {len(pieces)} tokens {shown} in this tokenizer; give a "
                         "string of exactly one token (mind the leading space: ' Paris') or its id")
    return int(pieces[0])


__all__ = ["METHODS", "check_explain_options", "explain_plan", "explain_program", "token_id"]

