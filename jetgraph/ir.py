"""The residual IR: a model as ``Dec ∘ (id + γ_L) ∘ … ∘ (id + γ_1) ∘ Enc``.

A :class:`ResidualProgram` holds an encoder, an ordered list of residual units and a decoder.
Each :class:`ResidualUnit` holds the *pure update* γ(h) (never h + γ(h)) as an FX GraphModule.
Units nest: a transformer block is a unit whose ``children`` are its attention and MLP units,
and the program can be viewed at ``"block"`` or ``"sublayer"`` granularity. Parallel residual
blocks (GPT-NeoX, GPT-J, Phi) have ``parallel=True``: their children read the same stream.

Side inputs (causal and padding masks, RoPE tables) are functions of the positions and the
attention mask only. They are computed once per input by :class:`SideInputs` and passed to the
units that need them; they are never expanded. Every entry point that reads token ids also takes
an ``attention_mask`` (:mod:`jetgraph.padding`): a padded batch gives each prompt's own results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal, Protocol

import networkx as nx
import torch
from torch import fx

from jetgraph.heads import HeadsNotFound, split_heads
from jetgraph.padding import as_attention_mask, mask_or_full

Granularity = Literal["block", "sublayer", "head"]
UnitKind = Literal["attn", "mlp"]
UnitEdit = Callable[[torch.Tensor], torch.Tensor]  # a unit's update γ(h) -> the update used instead
"""A unit's kind: ``"attn"`` if its update mixes positions (found by perturbing one), else ``"mlp"``."""

MODULE_SCOPE = "jetgraph_module_scope"
"""``node.meta`` key: the model's module path a node was traced in (``model.layers.3.mlp``),
recorded once by capture so that error messages in later layers can name it."""

PARAMETER_NAME = "jetgraph_parameter_names"
"""``GraphModule.meta`` key: the model's own name of each parameter or buffer target
(``m.model.embed_tokens.weight`` -> ``model.embed_tokens.weight``), recorded by capture."""


ENCODER_NAME = "embed"
DECODER_NAME = "unembed"
"""The names of the encoder and the decoder in unit graphs, paths and pictures."""


def unit_name(kind: str, layer: int, branch: int | None = None) -> str:
    """The name capture gives a unit: ``block3``, ``attn3``, ``mlp3`` (``mlp3_2``: the second
    MLP branch of block 3). :func:`parse_unit_name` reads it back."""
    return f"{kind}{layer}" + (f"_{branch}" if branch is not None else "")


def head_name(unit: str, head: int | None) -> str:
    """The name of head ``head`` of attention unit ``unit`` (``attn3.h5``), or of the unit's
    output bias when ``head`` is None (``attn3.bias``)."""
    return f"{unit}.h{head}" if head is not None else f"{unit}.bias"


def parse_unit_name(name: str) -> tuple[str, int] | None:
    """(kind, layer) of a name made by :func:`unit_name` (kind ``"block"``, ``"attn"`` or
    ``"mlp"``) or :func:`head_name` (kind ``"attn"``), or None: what path specs are checked
    against before a model is loaded."""
    unit, dot, part = name.partition(".")
    if dot:
        parsed = parse_unit_name(unit)
        is_head = part == "bias" or (part[:1] == "h" and part[1:].isdigit())
        return parsed if parsed and parsed[0] == "attn" and is_head else None
    for kind in ("block", "attn", "mlp"):
        if name.startswith(kind):
            layer, _, branch = name[len(kind):].partition("_")
            if layer.isdigit() and (not branch or branch.isdigit()):
                return kind, int(layer)
    return None


def module_scope(node: fx.Node) -> str:
    """The module path recorded for ``node`` at capture ("" when unknown)."""
    return node.meta.get(MODULE_SCOPE, "")


def parameter_name(graph_module: fx.GraphModule, target: str) -> str:
    """The model's own name for the parameter or buffer ``target`` of ``graph_module``."""
    return getattr(graph_module, "meta", {}).get(PARAMETER_NAME, {}).get(target, target)


def parameter_names(graph_module: fx.GraphModule) -> list[str]:
    """The model's names of every parameter and buffer ``graph_module`` reads."""
    return [parameter_name(graph_module, node.target) for node in graph_module.graph.nodes
            if node.op == "get_attr"]


class WeightStore(Protocol):
    """Where a program's weights live when they are not all in memory (a model read lazily
    from safetensors): :meth:`resident` makes the named parameters real inside a ``with``
    block and releases the ones it loaded afterwards."""

    def resident(self, names: Iterable[str]) -> AbstractContextManager[None]: ...


def check_granularity(granularity: object) -> Granularity:
    """``granularity`` if it is one jetgraph knows, else a ValueError naming the supported ones."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'block' (whole residual blocks), 'sublayer' (attention "
                         f"and MLP units) or 'head' (attention heads and MLP units), got {granularity!r}")
    return granularity  # type: ignore[return-value]


GRANULARITIES: tuple[str, ...] = ("block", "sublayer", "head")
DEFAULT_GRANULARITY: Granularity = "sublayer"
"""The one default view, for the library and the CLI: attention and MLP units, the names of the
path language (``E→mlp0→U``, ``--exclude attn``); ``prog.at("block")`` or ``granularity="block"``
gives a unit (and a lens state) per layer."""


def _parameter_count(graph_module: fx.GraphModule) -> int:
    seen: set[int] = set()
    total = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(graph_module, node.target)
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel()
    return total


def _get_attr(module: torch.nn.Module, target: str) -> object:
    return functools.reduce(getattr, target.split("."), module)


def _op_count(graph_module: fx.GraphModule) -> int:
    return sum(1 for node in graph_module.graph.nodes if node.op == "call_function")


@dataclass(eq=False, frozen=True)
class SideInputs:
    """Tensors that depend on positions and padding (masks, RoPE tables), computed from
    ``input_ids`` and ``attention_mask``.

    ``graph_module(input_ids, attention_mask)`` returns one tensor per name. ``positions_only``
    records whether capture verified that the values do not depend on token identity; only then
    can a unit be called on a stream tensor alone (the side inputs are then rebuilt from its
    shape, for an unpadded batch).
    """

    graph_module: fx.GraphModule
    names: tuple[str, ...]
    modules: tuple[str, ...]
    positions_only: bool

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        if not self.names:
            return {}
        # constants of every expansion, never differentiated; a side input can be a view of a
        # parameter (attention sinks), which would otherwise carry requires_grad into every jet.
        # forward(), not __call__: global module hooks (FLOP counters) must not see such views
        with torch.no_grad():
            values = self.graph_module.forward(input_ids, mask_or_full(attention_mask, input_ids))
        return {name: value.detach() for name, value in zip(self.names, values, strict=True)}

    def for_shape(self, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Side inputs for a stream of shape [batch, seq, d], rebuilt from placeholder ids."""
        if not self.names:
            return {}
        if not self.positions_only:
            raise ValueError(
                "this model's side inputs depend on token ids, not only on positions: "
                "pass side=prog.side_inputs(input_ids) explicitly"
            )
        return self(torch.zeros(batch, seq, dtype=torch.long, device=device))


@dataclass(eq=False, frozen=True)
class StreamFunction:
    """A GraphModule ``(h, *side) -> tensor`` whose first argument is a residual stream."""

    graph_module: fx.GraphModule
    side_inputs: tuple[str, ...]
    side: SideInputs = field(repr=False)

    def __call__(self, h: torch.Tensor, side: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.side_inputs:
            if side is None:
                side = self.side.for_shape(h.shape[0], h.shape[1], h.device)
            return self.graph_module(h, *(side[name] for name in self.side_inputs))
        return self.graph_module(h)

    @property
    def op_count(self) -> int:
        return _op_count(self.graph_module)

    @property
    def num_parameters(self) -> int:
        return _parameter_count(self.graph_module)


@dataclass(eq=False, frozen=True)
class ResidualUnit(StreamFunction):
    """One residual unit: the pure update γ(h) of ``h_next = h + γ(h)``.

    ``kind`` is ``"attn"`` if the update mixes positions, else ``"mlp"``. ``index`` is the unit's
    position in its granularity's list; ``reads`` is the index of the stream state it reads
    (equal to ``index`` except for the second and later branches of a parallel block).
    """

    name: str = ""
    kind: UnitKind = "mlp"
    layer: int = 0
    module_path: str = ""
    index: int = 0
    reads: int = 0
    children: tuple[ResidualUnit, ...] = ()
    parallel: bool = False

    @property
    def update(self) -> fx.GraphModule:
        """γ as an FX GraphModule: ``update(h, *side_inputs)``."""
        return self.graph_module

    def __repr__(self) -> str:
        return (
            f"ResidualUnit({self.name!r}, kind={self.kind!r}, layer={self.layer}, "
            f"module_path={self.module_path!r}, side_inputs={self.side_inputs})"
        )


@dataclass(eq=False, frozen=True)
class Encoder:
    """``(input_ids, attention_mask) -> h_0``; ``addends`` keeps token and positional embeddings
    separate (positions count real tokens only, so they follow the mask)."""

    graph_module: fx.GraphModule
    addends_module: fx.GraphModule
    addend_names: tuple[str, ...]
    module_path: str

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.graph_module(input_ids, mask_or_full(attention_mask, input_ids))

    def addends(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The terms whose sum is h_0 (e.g. ``token`` and ``position`` for GPT-2)."""
        values = self.addends_module(input_ids, mask_or_full(attention_mask, input_ids))
        return dict(zip(self.addend_names, values, strict=True))


@dataclass(eq=False, frozen=True)
class Decoder(StreamFunction):
    """``h_L -> logits``: the final norm and the unembedding.

    When the last op is an affine readout, ``norm`` maps h to the readout's input and
    ``unembedding`` (and ``unembedding_bias``) hold U, so logits = norm(h) @ U.T (+ b).
    """

    norm: StreamFunction | None = None
    unembedding: torch.Tensor | None = None
    unembedding_bias: torch.Tensor | None = None
    module_path: str = ""
    name: str = DECODER_NAME
    kind: Literal["decoder"] = "decoder"


@dataclass(eq=False, frozen=True)
class ResidualProgram:
    """A captured model as encoder, residual units and decoder; immutable (:meth:`replace` makes
    a changed copy that shares the graphs and weights).

    ``prog(input_ids)`` reproduces the model's logits; ``prog.stream(input_ids)`` returns the
    stream h_0..h_N around the units of this view; ``prog.at("sublayer")`` is the same program
    seen at sub-block granularity (attention and MLP units). Every method that takes
    ``input_ids`` takes an ``attention_mask`` too ([batch, seq], 1 = real token, 0 = padding on
    either side; None: no padding). ``reads_mask`` is False for a model whose forward takes no
    mask: only right padding is exact for it, and other masks are refused. ``max_positions`` is
    the model's context length (None when its config names none); ``weights`` the store of a
    model read lazily (None: every weight is in memory); ``fixed_sizes`` the (batch, seq) the
    export fixed (None where any size runs).
    """

    encoder: Encoder
    blocks: tuple[ResidualUnit, ...]
    decoder: Decoder
    side: SideInputs
    _: KW_ONLY
    granularity: Granularity = DEFAULT_GRANULARITY
    model_class: str = ""
    dynamic: bool = True
    example_input_ids: torch.Tensor | None = None
    reads_mask: bool = True
    max_positions: int | None = None
    weights: WeightStore | None = None
    fixed_sizes: tuple[int | None, int | None] = (None, None)
    memo: dict = field(default_factory=dict, init=False, repr=False)
    """Values higher layers derive from this program once (compiled path readers); never part of
    what the program is: :meth:`replace` and :meth:`at` start with an empty one."""

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def replace(self, **changes: object) -> ResidualProgram:
        """A copy with ``changes`` (e.g. ``weights=``), sharing everything else."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def resident(self, units: Iterable[ResidualUnit] = ()) -> AbstractContextManager[None]:
        """A context in which ``units``' weights are in memory (for a program whose weights are
        read lazily, :attr:`weights`; otherwise nothing to do). The encoder, side inputs and
        decoder stay in memory for the program's life."""
        if self.weights is None:
            return contextlib.nullcontext()
        names = [name for unit in units for name in parameter_names(unit.graph_module)]
        return self.weights.resident(names)

    # ----------------------------------------------------------------- views
    @functools.cached_property
    def sublayers(self) -> tuple[ResidualUnit, ...]:
        """Leaf units in execution order (a block without children is its own leaf)."""
        return tuple(leaf for block in self.blocks for leaf in (block.children or (block,)))

    @property
    def heads(self) -> tuple[ResidualUnit, ...]:
        """Units of the head view: each attention sublayer as its heads (``attn3.h0`` …, and
        ``attn3.bias`` when its output map has an offset), which read the same stream state and
        sum to the sublayer's update; MLP sublayers as they are. Found from the graph
        (:mod:`jetgraph.heads`) once per program and shared by its views; a ValueError names the
        attention unit whose heads cannot be found."""
        cached = _HEAD_VIEWS.get(self.encoder)
        if cached is None or cached[0] is not self.blocks:
            cached = (self.blocks, _head_view(self.sublayers))
            _HEAD_VIEWS[self.encoder] = cached
        return cached[1]

    def head_groups(self) -> dict[str, tuple[ResidualUnit, ...]]:
        """Sublayer name -> its units in the head view (the heads and bias of an attention
        sublayer; an MLP sublayer alone)."""
        groups: dict[str, list[ResidualUnit]] = {}
        for unit in self.heads:
            groups.setdefault(unit.name.partition(".")[0], []).append(unit)
        return {name: tuple(units) for name, units in groups.items()}

    @property
    def units(self) -> tuple[ResidualUnit, ...]:
        if self.granularity == "head":
            return self.heads
        return self.blocks if self.granularity == "block" else self.sublayers

    def at(self, granularity: Granularity) -> ResidualProgram:
        """The same program (shared graphs and weights) viewed at another granularity."""
        check_granularity(granularity)
        if granularity == self.granularity:
            return self
        return self.replace(granularity=granularity)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> ResidualUnit:
        return self.units[index]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.decoder.unembedding.shape[1]) if self.decoder.unembedding is not None else -1

    # ------------------------------------------------------------- execution
    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` checked for this program: int64 [batch, seq] each
        (the mask all ones when None)."""
        ids = as_input_ids(input_ids)
        for dim, (name, size) in enumerate(zip(("batch size", "sequence length"), self.fixed_sizes,
                                               strict=True)):
            if size is not None and ids.shape[dim] != size:
                raise ValueError(
                    f"input_ids of shape {tuple(ids.shape)}: this program accepts only {name} {size}, "
                    "as captured (torch.export fixed it, e.g. by unrolling a loop over the positions); "
                    "capture it again with an example of the shape you need")
        return ids, as_attention_mask(attention_mask, ids, reads_mask=self.reads_mask)

    def side_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
        return self.side(*self.inputs(input_ids, attention_mask))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        states, side = self._run(input_ids, attention_mask, keep="none")
        return self.decoder(states[-1], side)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """h_0, h_1, …, h_N: the stream before the first and after each unit of this view."""
        return self._run(input_ids, attention_mask, keep=self.granularity)[0]

    def stream_with_side_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`stream` and the side inputs it used, computed once."""
        return self._run(input_ids, attention_mask, keep=self.granularity)

    def intervene(self, input_ids: torch.Tensor, edits: Mapping[str, UnitEdit],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits with some units' updates replaced: ``edits`` maps a unit name (of either
        view: ``"block3"``, ``"mlp3"``, ``"attn0"``) to a function of the unit's update γ(h)
        [batch, seq, d] that returns the update to add instead (zeros: zero-ablation; a mean
        vector: mean-ablation). The rest of the model runs unchanged on the edited stream."""
        names = {u.name for u in self.blocks + self.sublayers}
        if any("." in name for name in edits):
            names |= {u.name for u in self.heads}
        unknown = sorted(set(edits) - names)
        if unknown:
            raise ValueError(f"no unit named {unknown[0]!r} to intervene on; units: "
                             f"{', '.join(u.name for u in self.units)}")
        states, side = self._run(input_ids, attention_mask, keep="none", edits=edits)
        return self.decoder(states[-1], side)

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: str,
        edits: Mapping[str, UnitEdit] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Execute leaf units in the model's own addition order, keeping states of one view."""
        input_ids, mask = self.inputs(input_ids, attention_mask)
        side = self.side(input_ids, mask)
        h = self.encoder(input_ids, mask)
        states = [h]
        for block in self.blocks:
            with self.resident([block]):  # a lazily read model streams one block at a time
                h = self._run_block(block, h, side, keep, states, edits or {})
        if keep == "none":
            states = [h]
        return states, side

    def _run_block(self, block: ResidualUnit, h: torch.Tensor, side: dict[str, torch.Tensor],
                   keep: str, states: list[torch.Tensor],
                   edits: Mapping[str, UnitEdit] | None = None) -> torch.Tensor:
        """Run one block's leaves on ``h`` (their updates passed through ``edits``); append the
        states ``keep`` asks for."""
        edits = edits or {}
        leaves = block.children or (block,)
        block_edit = edits.get(block.name) if block.children else None
        by_head = keep == "head" or any("." in name for name in edits)
        groups = self.head_groups() if by_head else {}
        head_parts: list[torch.Tensor] = []  # the head view's updates, in order (keep="head")

        def update(leaf: ResidualUnit, state: torch.Tensor) -> torch.Tensor:
            group = groups.get(leaf.name, (leaf,))
            if len(group) > 1:  # the sublayer as the sum of its heads (some of them edited)
                parts = [edits[u.name](u(state, side)) if u.name in edits else u(state, side)
                         for u in group]
                out = functools.reduce(operator.add, parts)
            else:
                parts = [out := leaf(state, side)]
            if leaf.name in edits:
                if keep == "head" and len(group) > 1:
                    raise ValueError(f"an edit of the whole {leaf.name} has no head states; edit its heads")
                parts = [out := edits[leaf.name](out)]
            head_parts.extend(parts)
            return out

        if block_edit is not None:  # the whole block edited: its leaves' sum goes through the edit
            before = h
            for leaf in leaves:
                h = h + leaf(before if block.parallel else h, side)
            h = before + block_edit(h - before)
            if keep in ("sublayer", "head"):
                raise ValueError(f"a whole-block edit has no {keep} states; edit its {keep}s instead")
            if keep == "block":
                states.append(h)
            return h
        before = h
        if block.parallel:
            outputs = [update(leaf, h) for leaf in leaves]
            partial = []
            for count in range(1, len(outputs) + 1):
                if keep == "sublayer" or count == len(outputs):
                    partial.append(h + functools.reduce(operator.add, outputs[:count]))
            h = partial[-1]
            if keep == "sublayer":
                states.extend(partial)
        else:
            for leaf in leaves:
                h = h + update(leaf, h)
                if keep == "sublayer":
                    states.append(h)
        if keep == "head":  # partial sums of the block's head-view updates; the last is h itself
            for count in range(1, len(head_parts)):
                states.append(before + functools.reduce(operator.add, head_parts[:count]))
            states.append(h)
        if keep == "block":
            states.append(h)
        return h

    def graph_modules(self) -> list[fx.GraphModule]:
        """Every graph of the program (encoder, side inputs, decoder and its norm, all units of
        both views); they share parameters and buffers."""
        modules = [self.encoder.graph_module, self.encoder.addends_module, self.side.graph_module,
                   self.decoder.graph_module]
        if self.decoder.norm is not None:
            modules.append(self.decoder.norm.graph_module)
        cached = _HEAD_VIEWS.get(self.encoder)
        heads = cached[1] if cached is not None and cached[0] is self.blocks else ()
        units = dict.fromkeys(self.blocks + self.sublayers + heads)
        return modules + [unit.graph_module for unit in units]

    def to(self, *args: object, **kwargs: object) -> ResidualProgram:
        """Move every graph's parameters and buffers (shared between views) in place."""
        for module in self.graph_modules():
            module.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------ inspection
    def summary_table(self) -> str:
        """A plain-text table: index, name, kind, module path, op count, parameters."""
        rows = [("idx", "unit", "kind", "reads", "module", "ops", "params")]
        rows.append(("-", ENCODER_NAME, "encoder", "-", self.encoder.module_path,
                     str(_op_count(self.encoder.graph_module)),
                     f"{_parameter_count(self.encoder.graph_module):,}"))
        for unit in self.units:
            rows.append((str(unit.index), unit.name, unit.kind, str(unit.reads), unit.module_path,
                         str(unit.op_count), f"{unit.num_parameters:,}"))
        rows.append(("-", DECODER_NAME, "decoder", "-", self.decoder.module_path,
                     str(self.decoder.op_count), f"{self.decoder.num_parameters:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            f"ResidualProgram of {self.model_class}: {len(self.blocks)} blocks, "
            f"{len(self.sublayers)} sublayer units, viewed at {self.granularity} granularity",
            f"side inputs: {', '.join(self.side.names) or 'none'}"
            + ("" if self.side.positions_only or not self.side.names else " (token-dependent)"),
        ]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
            if i == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def summary(self) -> None:
        """Print :meth:`summary_table`."""
        print(self.summary_table())

    def to_networkx(self) -> nx.DiGraph:
        """The unrolled unit graph: an edge from every producer to every unit that reads it.

        Nodes are ``"embed"``, the unit names and ``"unembed"`` (kinds ``"encoder"``, the units'
        and ``"decoder"``). A unit reads the stream state
        ``reads``, which is the sum of the encoder and every unit before that state, so the
        number of embed→unembed paths is 2^N for N sequential units (3 per parallel block).
        """
        graph = nx.DiGraph(model_class=self.model_class, granularity=self.granularity)
        graph.add_node(ENCODER_NAME, kind="encoder", module_path=self.encoder.module_path, index=-1)
        producers = [ENCODER_NAME]
        for unit in self.units:
            graph.add_node(unit.name, kind=unit.kind, layer=unit.layer,
                           module_path=unit.module_path, index=unit.index)
            for producer in producers[: unit.reads + 1]:
                graph.add_edge(producer, unit.name)
            producers.append(unit.name)
        graph.add_node(DECODER_NAME, kind="decoder", module_path=self.decoder.module_path,
                       index=len(self.units))
        for producer in producers:
            graph.add_edge(producer, DECODER_NAME)
        return graph

    def __repr__(self) -> str:
        return (
            f"ResidualProgram({self.model_class}, blocks={len(self.blocks)}, "
            f"sublayers={len(self.sublayers)}, granularity={self.granularity!r})"
        )


_HEAD_VIEWS: weakref.WeakKeyDictionary[Encoder, tuple[tuple[ResidualUnit, ...], tuple[ResidualUnit, ...]]] = (
    weakref.WeakKeyDictionary())
"""Per program (keyed by its encoder, shared by its views): its blocks and its head view."""


def _head_view(sublayers: Sequence[ResidualUnit]) -> tuple[ResidualUnit, ...]:
    """The head view's units, indexed: an attention sublayer's heads (and bias) each read the
    state the sublayer read; their index runs on in execution order."""
    groups: list[tuple[ResidualUnit, ...]] = []
    for sub in sublayers:
        if sub.kind != "attn":
            groups.append((sub,))
            continue
        try:
            split = split_heads(sub.graph_module, sub.name)
        except HeadsNotFound as error:
            raise ValueError(f"granularity 'head' is not available for this model: {error} "
                             f"(module {sub.module_path or '?'}); use 'sublayer' or 'block'") from None
        pieces = [(head_name(sub.name, i), module) for i, module in enumerate(split.heads)]
        if split.bias is not None:
            pieces.append((head_name(sub.name, None), split.bias))
        groups.append(tuple(dataclasses.replace(sub, graph_module=module, name=name, children=())
                            for name, module in pieces))
    starts = [0]
    for group in groups:
        starts.append(starts[-1] + len(group))
    units = []
    for sub, group in zip(sublayers, groups, strict=True):
        for unit in group:
            units.append(dataclasses.replace(unit, index=len(units), reads=starts[sub.reads]))
    return tuple(units)


def as_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Validate token ids: a non-empty integer tensor [batch, seq] (or [seq]) as int64 [batch, seq]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"input_ids must be an integer tensor of shape [batch, seq], got {type(input_ids).__name__}"
            + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else "")
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}; give at least one "
                         "sequence of at least one token")
    return input_ids.long()


__all__ = [
    "DECODER_NAME",
    "ENCODER_NAME",
    "GRANULARITIES",
    "Decoder",
    "Encoder",
    "ResidualProgram",
    "ResidualUnit",
    "SideInputs",
    "StreamFunction",
    "as_input_ids",
    "check_granularity",
    "head_name",
    "module_scope",
    "parameter_name",
    "parse_unit_name",
    "unit_name",
]
