"""The lift pass: a captured FX graph becomes a :class:`~jetgraph.ir.ResidualProgram`.

Residual units are found from graph structure alone. Walking back from the logits, a *stream
node* is an ``add`` whose addends (looking through single-use adds) contain one node ``p`` that
every other stream-dependent addend depends on: ``s = p + γ(p)``. The walk repeats from ``p``
until it reaches a node that is not such an add: that is h_0, the encoder's output. Steps whose
adds sit in the same module scope (recorded at export, :data:`jetgraph.ir.MODULE_SCOPE`) form one
block; steps with several
addends that depend on ``p`` are parallel residual branches. No per-architecture code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from jetgraph.capture.expandable import check_expandable
from jetgraph.capture.export import SUPPORTED, CapturedGraph, strip_wrapper
from jetgraph.capture.subgraph import (
    GraphIndex,
    SideRegistry,
    combine_sum,
    combine_sum_minus_input,
    combine_tuple,
    descendants,
    extract,
    is_add,
    value_inputs,
)
from jetgraph.errors import CaptureError
from jetgraph.ir import (
    Decoder,
    Encoder,
    ResidualProgram,
    ResidualUnit,
    SideInputs,
    StreamFunction,
    UnitKind,
    module_scope,
    unit_name,
)
from jetgraph.padding import full_mask
from jetgraph.precision import HALF_ULPS, capture_tolerance, dtype_name, is_half

aten = torch.ops.aten

# Ops that return their (single) tensor input unchanged in value.
_TRANSPARENT = {
    aten.alias.default,
    aten.clone.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.contiguous.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
}
_READOUTS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}


@dataclass
class ResidualAdd:
    """One step of the stream: ``out = inp + Σ updates`` or, for a scaled stream, ``out = a·inp
    + Σ updates`` (``scaled`` is the node a·inp) or ``out = c·(inp + f(inp))`` (a rescaled
    step: ``updates`` is [out]). A scaled step's first branch computes its part minus ``inp``,
    so every unit stays a pure update γ(h) = out − h."""

    out: fx.Node
    inp: fx.Node
    updates: list[fx.Node]  # stream-dependent branches, in topological order
    constants: list[fx.Node]  # addends that do not read the stream (added to the first branch)
    scaled: fx.Node | None = None  # a·inp, added to the first branch
    minus_input: bool = False  # the first branch is Σ its outputs − inp

    @property
    def scope(self) -> str:
        return module_scope(self.out)

    def branch_outputs(self, position: int) -> list[fx.Node]:
        """The graph nodes branch ``position`` sums (before subtracting ``inp``)."""
        if position:
            return [self.updates[position]]
        return [self.updates[0], *self.constants, *([self.scaled] if self.scaled is not None else [])]


def lift(captured: CapturedGraph, granularity: str = "block") -> ResidualProgram:
    """Find the residual units of ``captured`` and build its residual program."""
    index = GraphIndex.build(captured.graph_module)
    logits = _logits_node(captured.graph_module.graph)
    found = _walk_stream(index, logits, captured.model_class, None)
    if not isinstance(found, CaptureError):
        return _lift_found(captured, index, logits, granularity, *found)
    # no chain of additive steps: perhaps one of steps whose skip maps the stream (hyper-connections)
    mixed = _walk_stream(index, logits, captured.model_class, {})
    if isinstance(mixed, CaptureError):
        raise found
    try:
        return _lift_found(captured, index, logits, granularity, *mixed)
    except Exception as exc:  # not such a model either: the first walk's refusal says why
        found.add_note(f"(a walk accepting mixed steps failed too: {type(exc).__name__}: {exc})")
        raise found from None


def _lift_found(captured: CapturedGraph, index: GraphIndex, logits: fx.Node, granularity: str,
                steps: list[ResidualAdd], h0: fx.Node) -> ResidualProgram:
    nodes = list(captured.graph_module.graph.nodes)
    stream = descendants(nodes, [h0])
    cutter = _Cutter(index, stream, SideRegistry(), captured.model_class,
                     _encoder_extras(nodes, stream, steps))
    encoder = _build_encoder(index, h0, captured)
    cut_blocks = [cutter.block(layer, block_steps) for layer, block_steps in enumerate(_group_blocks(steps))]
    decoder_region = cutter.region([(steps[-1].out, "h")], [logits], "the decoder")
    readout = _readout(index, steps[-1].out, logits)
    norm_region = cutter.region([(steps[-1].out, "h")], [readout.x], "the final norm") if readout else None
    # every region is cut, so the side-input table is complete
    side = _build_side_inputs(index, cutter.side_registry, captured)
    blocks: list[ResidualUnit] = []
    leaf_index = 0
    for layer, cut in enumerate(cut_blocks):
        children = []
        first = leaf_index  # parallel branches all read the stream state at the block's start
        for leaf in cut.leaves:
            reads = first if cut.parallel else leaf_index
            children.append(ResidualUnit(leaf.fn, leaf.side_inputs, side, layer=layer,
                                         module_path=leaf.module_path, index=leaf_index, reads=reads))
            leaf_index += 1
        blocks.append(ResidualUnit(cut.region.fn, cut.region.side_inputs, side,
                                   name=unit_name("block", layer), layer=layer,
                                   module_path=cut.region.module_path, index=layer, reads=layer,
                                   children=tuple(children), parallel=cut.parallel))
    decoder = Decoder(
        decoder_region.fn, decoder_region.side_inputs, side,
        norm=StreamFunction(norm_region.fn, norm_region.side_inputs, side) if norm_region else None,
        unembedding=readout.weight if readout else None,
        unembedding_bias=readout.bias if readout else None,
        module_path=_unit_module_path(decoder_region.fn, module_scope(logits)),
    )
    program = ResidualProgram(encoder, blocks, decoder, side, granularity="block",
                              model_class=captured.model_class, dynamic=captured.dynamic,
                              fixed_sizes=captured.fixed_sizes,
                              example_input_ids=captured.example_input_ids,
                              reads_mask=captured.reads_mask, max_positions=captured.max_positions)
    program = assign_kinds(program, captured.example_input_ids)
    verify(program, captured)
    check_expandable(program, captured.example_input_ids, captured.example_attention_mask)
    return program.at(granularity)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stream
def _logits_node(graph: fx.Graph) -> fx.Node:
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _peel(node: fx.Node) -> fx.Node:
    """Look through value-preserving ops: clones, same-dtype copies, and views that keep the
    last (model) dimension, such as OPT's flattening of the stream to [batch*seq, d]."""
    while node.op == "call_function" and node.target in _TRANSPARENT:
        parent = node.args[0]
        if not isinstance(parent, fx.Node):
            break
        pval, nval = parent.meta.get("val"), node.meta.get("val")
        if not isinstance(pval, torch.Tensor) or not isinstance(nval, torch.Tensor):
            break
        if pval.dtype != nval.dtype or pval.shape[-1] != nval.shape[-1]:
            break
        node = parent
    return node


def _addends(node: fx.Node, scope: str | None = None) -> list[fx.Node]:
    """Operands of a tree of adds, descending into adds used only by the tree and computed in
    the same module as its root: a sum a submodule returns (an MoE's routed + shared experts)
    is one addend, a sum the block itself forms (GPT-J's h + attn + mlp) is several."""
    scope = module_scope(node) if scope is None else scope
    result: list[fx.Node] = []
    for operand in node.args[:2]:
        if not isinstance(operand, fx.Node):
            result.append(operand)
        elif (is_add(operand) and len(operand.users) == 1 and _same_shape(operand, node)
              and module_scope(operand) == scope):
            result.extend(_addends(operand, scope))
        else:
            result.append(operand)
    return result


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _split(index: GraphIndex, node: fx.Node, mixed: dict[fx.Node, ResidualAdd | None] | None = None
           ) -> ResidualAdd | None:
    """``node = p + Σ updates`` (or ``a·p + Σ updates``, or ``c·(p + f(p))``) with every update
    depending on p's value, or None. ``mixed`` (a memo) also accepts a sum whose skip is a map
    of p (:func:`_mixed_skip`)."""
    val = node.meta.get("val")
    if node not in index.on_ids or not isinstance(val, torch.Tensor) or not val.is_floating_point() \
            or val.dim() < 2:
        return None
    if not is_add(node):
        return _rescaled(index, node)
    if mixed is None:
        return _additive(index, node)
    if node not in mixed:
        mixed[node] = None  # a cycle guard while the candidates below are tried
        mixed[node] = _chained(index, node, mixed)
    return mixed[node]


def _chained(index: GraphIndex, node: fx.Node, memo: dict[fx.Node, ResidualAdd | None]) -> ResidualAdd | None:
    """The step ending at ``node`` that continues the chain: the additive one if its input is
    itself a step, else a mixed one whose input is (a normalised skip: MiniMax's ``α·LN(h) +
    β·f(LN(h))`` is additive in LN(h), which no step writes, and a mixed step from h, which one
    does; post-LN blocks ``LN(h + f(h))`` likewise), else either."""
    additive = _additive(index, node)
    if additive is not None and _split(index, additive.inp, memo) is not None:
        return additive
    mixed = _mixed_skip(index, node, memo)
    if mixed is not None and _split(index, mixed.inp, memo) is not None:
        return mixed
    return additive if additive is not None else mixed


def _additive(index: GraphIndex, node: fx.Node) -> ResidualAdd | None:
    addends = _addends(node)
    if any(not isinstance(a, fx.Node) for a in addends):
        return None
    for candidate in sorted(addends, key=index.order.__getitem__):
        if candidate not in index.on_ids or not _same_shape(candidate, node):
            continue
        others = [a for a in addends if a is not candidate]
        scaled = _scaled_input(index, candidate)
        for stream, scale in ((candidate, None), (scaled, candidate)):
            if stream is None:
                continue
            updates = sorted((a for a in others if index.depends_on_value(stream, a)),
                             key=index.order.__getitem__)
            if updates:
                constants = [a for a in others if a not in updates]
                return ResidualAdd(node, _peel(stream), updates, constants, scaled=scale,
                                   minus_input=scale is not None)
    return None


_AFFINE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
           aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar}


def _scaled_input(index: GraphIndex, node: fx.Node) -> fx.Node | None:
    """p when ``node`` is an affine map of p by constants of the model: ``p·c``, ``c·p``, ``p/c``,
    ``(p + b)·c`` … (c, b numbers or parameters with at most one value per channel: Doge's and
    MiniCPM's residual scales, Zaya's scaled and shifted residual), else None."""
    stream, steps = node, 0
    while True:
        inner = _affine_operand(index, stream)
        if inner is None:
            return stream if steps else None
        stream, steps = inner, steps + 1


def _affine_operand(index: GraphIndex, node: fx.Node) -> fx.Node | None:
    """x when ``node`` is ``x·c``, ``c·x``, ``x/c``, ``x ± b`` or ``b + x`` with c, b constants."""
    if node.op != "call_function" or node.target not in _AFFINE:
        return None
    a, b = node.args[:2]
    commutes = node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar)
    for stream, constant in [(a, b), (b, a)] if commutes else [(a, b)]:
        if not isinstance(stream, fx.Node) or stream not in index.on_ids or not _same_shape(stream, node):
            continue
        if not isinstance(constant, fx.Node):
            return stream
        value = constant.meta.get("val")
        if (constant not in index.on_ids and isinstance(value, torch.Tensor)
                and value.numel() <= node.meta["val"].shape[-1]):
            return stream
    return None


def _mixed_skip(index: GraphIndex, node: fx.Node, memo: dict[fx.Node, ResidualAdd | None]
                ) -> ResidualAdd | None:
    """``node = S(p) + Σ f(p)``: two or more addends that all read p, where the skip S is not the
    identity or a constant scale: hyper-connections (DeepSeek-V4: ``comb(H)ᵀ·H + post(H) ⊗
    f(pre(H)·H)``, the streams mixed by input-dependent weights). One step p -> node whose
    update is ``node − p``, skip map included, so it is expanded by its jet like any update.
    p is the latest value that every addend reads and that is itself a step, else the earliest
    one (h_0)."""
    addends = _addends(node)
    if len(addends) < 2 or any(not isinstance(a, fx.Node) or a not in index.on_ids for a in addends):
        return None
    shared = set.intersection(*(_value_ancestors(index, a) for a in addends))
    candidates = sorted((p for p in shared if p not in addends and p.op == "call_function"
                         and _same_shape(p, node) and p.meta["val"].is_floating_point()),
                        key=index.order.__getitem__)
    if not candidates:
        return None
    inp = next((p for p in reversed(candidates) if _split(index, _peel(p), memo) is not None), candidates[0])
    return ResidualAdd(node, _peel(inp), [node], [], minus_input=True)


def _value_ancestors(index: GraphIndex, node: fx.Node) -> set[fx.Node]:
    """Every node whose value ``node``'s value depends on (``node`` included)."""
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in found and current in index.on_ids:
            found.add(current)
            stack.extend(value_inputs(current))
    return found


def _rescaled(index: GraphIndex, node: fx.Node) -> ResidualAdd | None:
    """``node = c·s`` where s is itself a residual step ``p + f(p)``: one step p -> node (gemma4
    scales each layer's output by a constant)."""
    inner = _scaled_input(index, node)
    step = _split(index, inner) if inner is not None and is_add(inner) else None
    if step is None:
        return None
    return ResidualAdd(node, step.inp, [node], [], minus_input=True)


def _walk_stream(index: GraphIndex, logits: fx.Node, model_class: str,
                 mixed: dict[fx.Node, ResidualAdd | None] | None
                 ) -> tuple[list[ResidualAdd], fx.Node] | CaptureError:
    """Walk the residual chain back from the logits: its steps and h_0, or the refusal (returned,
    not raised) when no chain reaches the encoder. ``mixed`` (a memo) also accepts steps whose
    skip is a map of the stream (:func:`_mixed_skip`)."""
    feeding = index.ancestors([logits])
    last = None
    for node in reversed(list(index.graph_module.graph.nodes)):
        if node in feeding and _split(index, node, mixed) is not None:
            last = node
            break
    if last is None:
        return CaptureError(
            "no residual add (h + f(h)) feeds the logits, so there is no residual stream to "
            "expand. " + SUPPORTED,
            model_class=model_class,
        )
    steps: list[ResidualAdd] = []
    node = last
    while (step := _split(index, node, mixed)) is not None:
        steps.append(step)
        node = step.inp
    steps.reverse()
    h0 = node
    before = index.ancestors([h0])
    stray = [n for n in index.graph_module.graph.nodes if n in before and _split(index, n, mixed)]
    if stray:
        first = stray[-1]
        reason = (f"(the sum h + f(h) at node '{first.name}' is not the stream the next unit reads: "
                  "a norm sits between units, as in post-LN models (BERT, OPT with "
                  "do_layer_norm_before=False) and streams normalised between units (DeepNorm-style "
                  "α·LN(h) + f(LN(h)), unit-sphere streams), or the stream is rebuilt from several "
                  "earlier states), so the model is not a composition of residual units id + γ of "
                  "one stream")
        return CaptureError(
            "the residual stream is interrupted between residual adds " + reason + ". " + SUPPORTED,
            model_class=model_class,
            module=module_scope(first),
            node=first.name,
        )
    return steps, h0


def _encoder_extras(nodes: list[fx.Node], stream: set[fx.Node], steps: Sequence[ResidualAdd]) -> set[fx.Node]:
    """Values computed from the encoder's output h_0 alone that units after the first step read
    (Gemma 4's per-layer inputs: a projection of the token embeddings, sliced per layer). They are
    functions of the tokens, like the encoder's output itself, so every unit that reads them takes
    them as side inputs, held in its jets. A value that depends on a later stream state read
    at a second depth (Zaya's router state) is not one: it stays refused by the cutter."""
    outs = {step.out for step in steps}
    deep = descendants(nodes, list(outs))
    return {node for node in stream - deep if isinstance(node.meta.get("val"), torch.Tensor)
            and any(user in deep and user not in outs for user in node.users)}


def _group_blocks(steps: Sequence[ResidualAdd]) -> list[list[ResidualAdd]]:
    """Consecutive steps whose adds share a (non-root) module scope form one block."""
    blocks: list[list[ResidualAdd]] = []
    for step in steps:
        if blocks and step.scope and blocks[-1][-1].scope == step.scope:
            blocks[-1].append(step)
        else:
            blocks.append([step])
    return blocks


# --------------------------------------------------------------------------- regions
@dataclass
class Region:
    """A cut-out GraphModule ``(h, *side) -> value``, its side inputs and its module path."""

    fn: fx.GraphModule
    side_inputs: tuple[str, ...]
    module_path: str


@dataclass
class CutBlock:
    region: Region
    leaves: list[Region]
    parallel: bool


@dataclass
class _Cutter:
    """Cuts stream-reading regions out of one captured graph, sharing one side-input registry."""

    index: GraphIndex
    stream: set[fx.Node]
    side_registry: SideRegistry
    model_class: str
    extra: set[fx.Node] = dataclasses.field(default_factory=set)

    def region(self, inputs: list[tuple[fx.Node, str]], outputs: list[fx.Node], what: str,
               stream_outputs: bool = False, scope: str = "", minus_input: bool = False) -> Region:
        """Cut ``inputs -> outputs`` (their sum, minus the first input with ``minus_input``);
        errors gain the model class and what is supported."""
        h0 = min(self.stream, key=self.index.order.__getitem__)
        try:
            fn, side_names = extract(self.index, inputs, outputs,
                                     combine=combine_sum_minus_input if minus_input else combine_sum,
                                     stream=self.stream, side=self.side_registry,
                                     stream_shape=h0.meta["val"].shape,
                                     stream_outputs=stream_outputs, what=what, extra=self.extra)
        except CaptureError as exc:
            raise CaptureError(str(exc) + ". " + SUPPORTED, model_class=self.model_class,
                               module=exc.module, node=exc.node) from None
        return Region(fn, side_names, _unit_module_path(fn, scope))

    def block(self, layer: int, block_steps: list[ResidualAdd]) -> CutBlock:
        """One block and its leaf units (one per update branch of each step). A block that is a
        sequence of steps keeps a step's parallel branches together as one unit (Falcon-H1:
        mamba ‖ attention, then the MLP): the IR nests two levels, block and sublayer."""
        if len(block_steps) > 1:
            block_steps = [_one_branch(step) for step in block_steps]
        leaves = []
        for step in block_steps:
            for position in range(len(step.updates)):
                leaves.append(self.region([(step.inp, "h")], step.branch_outputs(position),
                                          f"unit {len(leaves)} of block {layer}", stream_outputs=True,
                                          scope=step.scope, minus_input=step.minus_input and not position))
        if any(step.minus_input for step in block_steps):  # the block's update is its output − h
            region = self.region([(block_steps[0].inp, "h")], [block_steps[-1].out], f"block {layer}",
                                 stream_outputs=True, minus_input=True)
        else:
            outputs = [n for step in block_steps for n in step.updates + step.constants]
            region = self.region([(block_steps[0].inp, "h")], outputs, f"block {layer}",
                                 stream_outputs=True)
        region.module_path = block_steps[0].scope or (leaves[0].module_path if len(leaves) == 1 else "")
        parallel = len(block_steps) == 1 and len(block_steps[0].updates) > 1
        return CutBlock(region, leaves, parallel)


def _one_branch(step: ResidualAdd) -> ResidualAdd:
    """``step`` with all its branches summed in one (the others join its constants)."""
    if len(step.updates) <= 1:
        return step
    return dataclasses.replace(step, updates=step.updates[:1], constants=step.updates[1:] + step.constants)


def _unit_module_path(fn: fx.GraphModule, scope: str) -> str:
    """The module holding most of the unit's parameters (>75%), else their common prefix."""
    sizes: dict[str, int] = {}
    for node in fn.graph.nodes:
        if node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), fn)
            module = strip_wrapper(node.target.rsplit(".", 1)[0])
            sizes[module] = sizes.get(module, 0) + value.numel()
    if not sizes:
        return scope
    parts = [path.split(".") for path in sizes]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    children: dict[str, int] = {}
    for path, size in sizes.items():
        rest = path[len(prefix):].lstrip(".").split(".")[0]
        child = f"{prefix}.{rest}" if prefix and rest else (rest or prefix)
        children[child] = children.get(child, 0) + size
    best, size = max(children.items(), key=lambda item: item[1])
    return best if size > 0.75 * sum(sizes.values()) else (prefix or scope)


def _build_encoder(index: GraphIndex, h0: fx.Node, captured: CapturedGraph) -> Encoder:
    embed, _ = extract(index, index.model_inputs(), [h0], what="the encoder")
    parts = _addends(h0) if is_add(h0) else [h0]
    if any(not isinstance(p, fx.Node) for p in parts):
        parts = [h0]
    addends_module, _ = extract(index, index.model_inputs(), parts,
                                combine=combine_tuple, what="the encoder addends")
    names = _addend_names(addends_module, captured.example_input_ids)
    scopes = sorted({module_scope(p) for p in parts})
    return Encoder(embed, addends_module, names, ", ".join(s for s in scopes if s))


def _addend_names(addends_module: fx.GraphModule, ids: torch.Tensor) -> tuple[str, ...]:
    """``token`` for addends that depend on token identity, ``position`` for the others."""
    mask = full_mask(ids)
    with torch.no_grad():
        first = addends_module(ids, mask)
        second = addends_module((ids + 1) % max(int(ids.max()) + 1, 2), mask)
    kinds = ["token" if not torch.equal(a, b) else "position" for a, b in zip(first, second, strict=True)]
    names = []
    for kind in kinds:
        count = sum(1 for k in kinds if k == kind)
        names.append(kind if count == 1 else f"{kind}{sum(1 for n in names if n.startswith(kind))}")
    return tuple(names)


@dataclass
class Readout:
    """The decoder's final affine map: logits = x @ weight.T (+ bias)."""

    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


def _readout(index: GraphIndex, h_last: fx.Node, logits: fx.Node) -> Readout | None:
    """The unembedding, when the logits are an affine readout of a function of h_L."""
    if logits.op != "call_function" or logits.target not in _READOUTS:
        return None
    weight_node, x_node, bias_node = _readout_operands(logits)
    if weight_node is None or not index.is_ancestor(h_last, x_node):
        return None
    weight = _attr(index.graph_module, weight_node)
    if logits.target is not aten.linear.default and weight.shape[0] != _vocab(logits):
        weight = weight.t()  # mm/matmul/addmm read x @ W with W [d, vocab]
    bias = _attr(index.graph_module, bias_node) if bias_node is not None else None
    return Readout(x_node, weight, bias)


def _vocab(logits: fx.Node) -> int:
    return int(logits.meta["val"].shape[-1])


def _readout_operands(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None, fx.Node | None]:
    """(weight get_attr, input, bias get_attr) of an affine readout, looking through transposes."""
    def attr(n: object) -> fx.Node | None:
        while isinstance(n, fx.Node) and n.op == "call_function" and n.target in (
            aten.t.default, aten.permute.default, aten.transpose.int):
            n = n.args[0]
        return n if isinstance(n, fx.Node) and n.op == "get_attr" else None

    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else None
        return attr(node.args[1]), node.args[0], attr(bias) if bias is not None else None
    if node.target is aten.addmm.default:
        return attr(node.args[2]), node.args[1], attr(node.args[0])
    return attr(node.args[1]), node.args[0], None


def _attr(module: torch.nn.Module, node: fx.Node) -> torch.Tensor:
    return functools.reduce(getattr, node.target.split("."), module)


# --------------------------------------------------------------------------- checks
def _build_side_inputs(index: GraphIndex, registry: SideRegistry, captured: CapturedGraph) -> SideInputs:
    """The side-input table: one graph ``(input_ids, attention_mask) -> (mask, cos, sin, …)``."""
    nodes = list(registry.nodes)
    module, _ = extract(index, index.model_inputs(), nodes, combine=combine_tuple,
                        what="the side inputs")
    return SideInputs(module, tuple(registry.nodes[n] for n in nodes),
                      tuple(module_scope(n) for n in nodes),
                      positions_only=_positions_only(module, captured, bool(nodes)))


def _positions_only(side_module: fx.GraphModule, captured: CapturedGraph, any_side: bool) -> bool:
    if not any_side:
        return True
    ids = captured.example_input_ids
    with torch.no_grad():
        first = side_module(ids, full_mask(ids))
        second = side_module(torch.zeros_like(ids), full_mask(ids))
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def assign_kinds(program: ResidualProgram, ids: torch.Tensor) -> ResidualProgram:
    """``program`` with each leaf's kind found: ``attn`` if perturbing position 0 changes its
    update at later positions, else ``mlp``; and the units named (:func:`name_units`)."""
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 2)
    kinds: list[UnitKind] = []
    with torch.no_grad():
        states = program.at("sublayer").stream(ids)
        side = program.side_inputs(ids)
        generator = torch.Generator().manual_seed(0)
        for leaf in program.sublayers:
            h = states[leaf.reads]
            out = leaf(h, side)
            moved = h.clone()
            noise = torch.randn(moved[:, 0].shape, generator=generator, dtype=h.dtype)
            moved[:, 0] = noise.to(h.device) * h.std() + h[:, 0]
            out_moved = leaf(moved, side)
            scale = out[:, 1:].abs().max().clamp_min(1e-12)
            mixes = (out_moved[:, 1:] - out[:, 1:]).abs().max() > 1e-5 * scale
            kinds.append("attn" if mixes else "mlp")
    return name_units(program, kinds)


def name_units(program: ResidualProgram, kinds: Sequence[UnitKind] | None = None) -> ResidualProgram:
    """``program`` with its leaves of the given ``kinds`` (default: their own), the unnamed ones
    named by kind and layer (``attn3``; ``mlp3_2`` for a second MLP branch), and each block with
    children of kind ``attn`` if any child mixes positions. Units are made anew: never changed."""
    leaves = program.sublayers
    kinds = list(kinds) if kinds is not None else [leaf.kind for leaf in leaves]
    counts: dict[tuple[int, str], int] = {}
    for leaf, kind in zip(leaves, kinds, strict=True):
        counts[(leaf.layer, kind)] = counts.get((leaf.layer, kind), 0) + 1
    seen: dict[tuple[int, str], int] = {}
    made: dict[int, ResidualUnit] = {}
    for leaf, kind in zip(leaves, kinds, strict=True):
        key = (leaf.layer, kind)
        seen[key] = seen.get(key, 0) + 1
        name = leaf.name or unit_name(kind, leaf.layer, None if counts[key] == 1 else seen[key])
        made[id(leaf)] = dataclasses.replace(leaf, kind=kind, name=name)
    blocks = []
    for block in program.blocks:
        if not block.children:
            blocks.append(made[id(block)])
            continue
        children = tuple(made[id(child)] for child in block.children)
        kind: UnitKind = "attn" if any(c.kind == "attn" for c in children) else "mlp"
        blocks.append(dataclasses.replace(block, children=children, kind=kind))
    return program.replace(blocks=tuple(blocks))


def verify(program: ResidualProgram, captured: CapturedGraph) -> None:
    """The lifted program must reproduce the model's logits on the example input."""
    with torch.no_grad():
        logits = program(captured.example_input_ids, captured.example_attention_mask)
    reference = captured.reference_logits
    same_shape = logits.shape == reference.shape
    error = (logits.float() - reference.float()).abs().max().item() if same_shape else float("inf")
    relative = capture_tolerance(reference.dtype)
    tolerance = relative * max(1.0, reference.float().abs().max().item())
    if not error <= tolerance:
        precision = (f"the tolerance for {dtype_name(reference.dtype)} logits is {relative:.3g} of their "
                     f"largest magnitude ({HALF_ULPS} machine epsilons); an error this far above it is not "
                     "rounding: " if is_half(reference.dtype) else "")
        raise CaptureError(
            f"the lifted residual program does not reproduce the model's {dtype_name(reference.dtype)} "
            f"logits (max abs error {error:.3g} > {tolerance:.3g}); {precision}the graph has structure "
            "jetgraph does not model. " + SUPPORTED,
            model_class=captured.model_class,
        )
