"""Run a unit's graph at the last position of contexts that share their earlier tokens.

A pair table evaluates a position-mixing unit on contexts ``[z1, z2]`` for every ``z2`` of a row
and reads the last position only. Everything the unit does to the earlier positions on their own
(the norm, the key and value projections of ``z1``, the rotary embedding) is the same for the
whole row, and the earlier positions' queries and outputs are never read. :class:`LastPosition`
interprets the unit's FX graph with each stream-shaped value held as two parts:

- ``prefix``: the earlier positions, once per *group* of contexts with the same earlier positions;
- ``last``: the last position, once per context.

Position-wise ops run on each part; an op that mixes positions (a matmul contracting them, a
softmax or a reduction over them) gets the prefix expanded back to every context and joined with
the last position; a matmul whose rows are positions (the queries) keeps the last row only, and
from there values hold the last query position only. The unit's output is its last position.

Each op is classified from the export's symbolic shapes (which dimensions carry the batch and the
sequence size) and from aten's op tags (pointwise, reduction), never from knowledge of an
architecture. An op the interpreter cannot place raises :class:`PositionSplitError`, and a value
that should be shared by a group but is not (side inputs that depend on the later tokens)
raises it too: callers fall back to the whole graph.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch import fx

aten = torch.ops.aten


class PositionSplitError(RuntimeError):
    """The graph (or this input) cannot be split by position; evaluate it whole."""


class _NotShared(PositionSplitError):
    """A full value computed from the stream cannot be split: it may depend on the last position
    (the op then runs on the last position only)."""


@dataclass(frozen=True)
class Groups:
    """Contexts grouped by their earlier positions: ``first[g]`` is a context of group g (whose
    earlier positions stand for the group's), ``inverse[i]`` the group of context i."""

    first: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor, copies: int = 1) -> Groups:
        """Runs of consecutive contexts in ``ids`` [contexts, length] with the same tokens before
        the last (a table's rows come in such runs; equal prefixes apart form separate groups),
        for ``copies`` of the batch stacked along it (copy c's group g is group c·G + g)."""
        prefix = ids[:, :-1]
        starts = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        starts[1:] = (prefix[1:] != prefix[:-1]).any(1)
        first = starts.nonzero().squeeze(1)
        inverse = starts.long().cumsum(0) - 1
        contexts, count = len(ids), len(first)
        offsets = torch.arange(copies, device=ids.device)
        return cls((first + contexts * offsets[:, None]).reshape(-1),
                   (inverse + count * offsets[:, None]).reshape(-1))

    def __len__(self) -> int:
        return len(self.first)


@dataclass
class _Split:
    """A value with one sequence dimension, held as earlier positions per group and the last
    position per context."""

    prefix: torch.Tensor
    last: torch.Tensor


@dataclass
class _Full:
    """A value at every context; each of its sequence dimensions holds every position or the
    last one only (told apart by size). ``shared``: its earlier positions are equal within a
    group by construction (it was joined from a split). ``depends``: it is computed from the
    stream, so its values may depend on the last position (it is never split, except when
    shared); values that do not (side inputs, constants) are split under a checked claim that
    they are equal within a group."""

    tensor: torch.Tensor
    shared: bool = False
    depends: bool = False


@dataclass(frozen=True, eq=False)
class _Arg:
    """An argument as the interpreter holds it: the node it came from and its value. A pytree
    leaf (argument trees are walked with :mod:`torch.utils._pytree`); unpacks as ``node, value``."""

    node: fx.Node
    value: Any

    def __iter__(self):
        return iter((self.node, self.value))

    def __getitem__(self, index: int) -> Any:
        return (self.node, self.value)[index]


@dataclass(frozen=True)
class _Sym:
    """A symbolic size (``sym_size`` of the input, and arithmetic on it)."""

    expr: sympy.Expr


_POINTWISE_EXTRA = {aten._to_copy.default, aten.alias.default, aten.detach.default,
                    aten.lift_fresh_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                    aten.type_as.default}
_SOFTMAX = {aten._softmax.default, aten._log_softmax.default, aten.softmax.int,
            aten.log_softmax.int, aten._safe_softmax.default}
PARTS = ("prefix", "last")
REPLAYS = 8  # traced variants kept per unit (input shapes × group counts)
_CONCAT = {aten.cat.default, aten.stack.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default}
_SYM_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv}


class LastPosition:
    """``LastPosition(graph_module)(x, side, groups)``: the unit's output at the last position,
    [contexts, 1, width], for ``x`` [contexts, length, d] and ``side`` (its side inputs in order),
    equal to ``graph_module(x, *side)[:, -1:]`` up to matmul rounding.

    Construction only reads the graph's symbols; an unsupported graph fails on the first call.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.nodes = list(graph_module.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise PositionSplitError("the graph has no input")
        shape = _recorded_shape(placeholders[0])
        if shape is None or len(shape) < 3:
            raise PositionSplitError("the stream input has no [batch, seq, width] shape")
        batch, seq = shape[0], shape[1]
        if not (isinstance(batch, sympy.Symbol) and isinstance(seq, sympy.Symbol)):
            raise PositionSplitError("the graph was captured at fixed sizes: positions cannot be told apart")
        self.batch, self.seq = batch, seq
        self._stream = placeholders[0]
        self.shapes: dict[fx.Node, list[sympy.Expr] | None] = {}
        self._dims_of: dict[fx.Node, tuple[list[int], list[int], list[int]]] = {}
        self._sizes_of: dict[tuple[sympy.Expr, int, int], int] = {}
        self._replays: dict[tuple, fx.GraphModule] = {}
        for node in self.nodes:
            self.shapes[node] = _recorded_shape(node) or self._broadcast_shape(node)

    def _shape(self, node: fx.Node) -> list[sympy.Expr] | None:
        return self.shapes.get(node)

    def _broadcast_shape(self, node: fx.Node) -> list[sympy.Expr] | None:
        """The shape of a node the capture added without recording one: a pointwise op (its
        operands broadcast) or a reshape to sizes of the input."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return None
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self._reshaped(node)
        if torch.Tag.pointwise not in node.target.tags:
            return None
        shapes = [self.shapes.get(a) for a in node.all_input_nodes]
        if not shapes or any(s is None for s in shapes):
            return None
        width = max(len(s) for s in shapes)
        padded = [[sympy.Integer(1)] * (width - len(s)) + list(s) for s in shapes]
        out = []
        for sizes in zip(*padded, strict=True):
            wide = [x for x in sizes if x != 1]
            out.append(wide[0] if wide else sympy.Integer(1))
        return out

    def _reshaped(self, node: fx.Node) -> list[sympy.Expr] | None:
        source = self.shapes.get(node.args[0])
        if source is None:
            return None
        sizes: list[sympy.Expr | None] = []
        for item in node.args[1]:
            if isinstance(item, int):
                sizes.append(None if item == -1 else sympy.Integer(item))
            elif isinstance(item, fx.Node) and item.target is aten.sym_size.int \
                    and self.shapes.get(item.args[0]) is not None:
                sizes.append(self.shapes[item.args[0]][item.args[1]])
            else:
                return None
        if sizes.count(None) > 1:
            return None
        if None in sizes:
            known = sympy.Mul(*[x for x in sizes if x is not None])
            sizes[sizes.index(None)] = sympy.simplify(sympy.Mul(*source) / known)
        return sizes

    # ------------------------------------------------------------------ driver
    def __call__(self, x: torch.Tensor, side: Sequence[torch.Tensor], groups: Groups) -> torch.Tensor:
        """Interpreted once per input shape and group count, then replayed as a traced aten graph
        (the interpretation's Python work costs more than a small unit's arithmetic). Raises
        :class:`PositionSplitError` when a claim of equal earlier positions does not hold."""
        if x.shape[1] < 2:
            raise PositionSplitError("a context of one position has no earlier positions")
        weights = [_attr(self.graph_module, n.target) for n in self.nodes if n.op == "get_attr"]
        key = (tuple(x.shape), x.dtype, x.device, len(groups),
               tuple((tuple(t.shape), t.dtype) for t in side))
        replay = self._replays.get(key)
        if replay is None:
            from torch.fx.experimental.proxy_tensor import make_fx

            count = len(side)

            def traced(x, first, inverse, *tensors):
                return self._traceable(x, first, inverse, list(tensors[:count]), list(tensors[count:]))

            replay = make_fx(traced, tracing_mode="real")(x, groups.first, groups.inverse, *side, *weights)
            if len(self._replays) >= REPLAYS:
                self._replays.pop(next(iter(self._replays)))
            self._replays[key] = replay
        output, held = replay(x, groups.first, groups.inverse, *side, *weights)
        if not bool(held):
            raise PositionSplitError("contexts of one group differ at earlier positions: "
                                     "an input or side input depends on the later tokens")
        return output

    def _traceable(self, x: torch.Tensor, first: torch.Tensor, inverse: torch.Tensor,
                   side: list[torch.Tensor], weights: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        claims: list[torch.Tensor] = []
        output = self.interpret(x, side, Groups(first, inverse), weights, claims)
        held = torch.stack([c.reshape(()) for c in claims]).all() if claims else \
            torch.ones((), dtype=torch.bool, device=x.device)
        return output, held

    def interpret(self, x: torch.Tensor, side: Sequence[torch.Tensor], groups: Groups,
                  weights: Sequence[torch.Tensor] | None = None,
                  claims: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One interpreted run (what the replay records). ``claims`` collects a boolean tensor
        per value split under the claim that a group's earlier positions are equal; without it
        the claims are checked here."""
        contexts, length = x.shape[0], x.shape[1]
        self.contexts, self.length, self.groups = contexts, length, groups
        self._claims = claims
        self._parts_cache: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        output = _SplitInterpreter(self, weights).run(x, *side, enable_io_processing=False)
        if isinstance(output, (tuple, list)):
            if len(output) != 1:
                raise PositionSplitError("the unit returns more than one value")
            output, = output
        return self._last_of(output, _first_output_node(self.nodes))

    def _run_node(self, node: fx.Node, env: dict[fx.Node, Any], inputs, attrs) -> Any:
        """One node of the interpreted run (:class:`_SplitInterpreter`)."""
        if node.op in ("call_function", "call_module") and not node.users:
            return None  # unused (guards, asserts): the output does not depend on it
        if node.op == "placeholder":
            value = next(inputs)
            return self._split_input(node, value) if node is self._stream else _Full(value)
        if node.op == "get_attr":
            return next(attrs) if attrs is not None else _attr(self.graph_module, node.target)
        if node.op == "call_function":
            try:
                return self._call(node, env)
            except PositionSplitError:
                raise
            except torch.OutOfMemoryError:
                raise
            except (TypeError, IndexError, KeyError, ValueError, AttributeError, RuntimeError) as error:
                raise PositionSplitError(f"{node.name} ({node.target}): {error}") from error
        if node.op == "output":
            return fx.node.map_arg(node.args[0], lambda n: env[n])
        raise PositionSplitError(f"{node.op} nodes are not supported ({node.name})")

    def _claim(self, node: fx.Node, spread: torch.Tensor, value: torch.Tensor) -> None:
        """``spread`` (the group's representative, repeated) equals ``value``: checked now, or
        collected for the replay to check on every call."""
        if self._claims is not None:
            self._claims.append((spread == value).all())
        elif not torch.equal(spread, value):
            raise PositionSplitError(f"{node.name}: contexts of one group differ at earlier positions")

    # ------------------------------------------------------------------ values
    def _split_input(self, node: fx.Node, value: torch.Tensor) -> _Split:
        prefix, last = self._parts(node, value)
        return _Split(prefix.contiguous(), last.contiguous())  # matmuls on strided slices are slower

    def _dims(self, node: fx.Node) -> tuple[list[int], list[int], list[int]]:
        """(sequence dims, batch dims, batch·sequence dims) of ``node``'s value, from its
        symbolic shape; a batch·sequence dim is the two flattened (``view(-1, d)``)."""
        if node not in self._dims_of:
            self._dims_of[node] = self._find_dims(node)
        return self._dims_of[node]

    def _find_dims(self, node: fx.Node) -> tuple[list[int], list[int], list[int]]:
        shape = self._shape(node)
        if shape is None:
            raise PositionSplitError(f"{node.name} has no recorded shape")
        seq_dims, batch_dims, merged = [], [], []
        for dim, expr in enumerate(shape):
            free = getattr(expr, "free_symbols", set())
            if free - {self.batch, self.seq}:
                raise PositionSplitError(f"{node.name} has a size in other symbols: {expr}")
            if expr == self.seq:
                seq_dims.append(dim)
            elif expr == self.batch:
                batch_dims.append(dim)
            elif expr == self.batch * self.seq:
                merged.append(dim)
            elif free:
                raise PositionSplitError(f"{node.name}: positions or the batch in a dimension of size {expr}")
        return seq_dims, batch_dims, merged

    def _unmerged(self, node: fx.Node) -> tuple[list[int], list[int]]:
        """(sequence dims, batch dims) of a value that is to be split or joined."""
        seq_dims, batch_dims, merged = self._dims(node)
        if merged:
            raise PositionSplitError(f"{node.name}: positions flattened with the batch")
        return seq_dims, batch_dims

    def _last_dims(self, node: fx.Node, tensor: torch.Tensor) -> set[int]:
        """Sequence (or batch·sequence) dims of a full value that hold the last position only."""
        seq_dims, _, merged = self._dims(node)
        return {d for d in seq_dims if tensor.shape[d] == 1} | \
            {d for d in merged if tensor.shape[d] == self.contexts}

    def _state(self, node: fx.Node, tensor: torch.Tensor) -> str:
        """"none" (no positions), "full", "last" (last position only) or "mixed"."""
        seq_dims, _, merged = self._dims(node)
        last = self._last_dims(node, tensor)
        if not seq_dims + merged:
            return "none"
        return "full" if not last else "last" if len(last) == len(seq_dims + merged) else "mixed"

    def _parts(self, node: fx.Node, tensor: torch.Tensor, shared: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A full value at every position as (prefix per group, last per context)."""
        cached = self._parts_cache.get(node.name)
        if cached is not None and cached[0] is tensor:
            return cached[1]
        seq_dims, batch_dims = self._unmerged(node)
        if len(seq_dims) > 1:
            raise PositionSplitError(f"{node.name} has {len(seq_dims)} sequence dimensions to split")
        if any(tensor.shape[d] != self.length for d in seq_dims):
            raise PositionSplitError(f"{node.name} holds the last position only")
        prefix, last = tensor, tensor
        for dim in batch_dims:
            if tensor.shape[dim] == self.contexts:
                prefix = prefix.index_select(dim, self.groups.first)
        for dim in seq_dims:
            prefix = prefix.narrow(dim, 0, self.length - 1)
            last = last.narrow(dim, self.length - 1, 1)
        if not shared and seq_dims:
            earlier = tensor.narrow(seq_dims[0], 0, self.length - 1)
            spread = prefix
            for dim in batch_dims:
                if tensor.shape[dim] == self.contexts:
                    spread = spread.index_select(dim, self.groups.inverse)
            self._claim(node, spread, earlier)
        self._parts_cache[node.name] = (tensor, (prefix, last))
        return prefix, last

    def _join(self, node: fx.Node, value: _Split) -> _Full:
        seq_dims, batch_dims = self._unmerged(node)
        if len(seq_dims) != 1:
            raise PositionSplitError(f"{node.name}: a split value needs exactly one sequence dimension")
        prefix = value.prefix
        for dim in batch_dims:
            if prefix.shape[dim] == len(self.groups) and value.last.shape[dim] == self.contexts:
                prefix = prefix.index_select(dim, self.groups.inverse)
        return _Full(torch.cat([prefix, value.last], seq_dims[0]), shared=True, depends=True)

    def _last_of(self, value: Any, node: fx.Node) -> torch.Tensor:
        if isinstance(value, _Split):
            return value.last
        if not isinstance(value, _Full):
            raise PositionSplitError("the unit's output does not depend on its input")
        tensor = value.tensor
        for dim in self._unmerged(node)[0]:
            if tensor.shape[dim] == self.length:
                tensor = tensor.narrow(dim, self.length - 1, 1)
        return tensor

    # ------------------------------------------------------------------ ops
    def _call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: _Arg(n, env[n]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _Arg(n, env[n]))
        target = node.target
        if target is aten.sym_size.int:
            if isinstance(node.meta.get("val"), (torch.SymInt, int)):
                return _Sym(_meta_expr(node))
            shape = self._shape(node.args[0])
            if shape is None:
                raise PositionSplitError(f"{node.name}: the size of a value without a recorded shape")
            return _Sym(shape[node.args[1]])
        if target in _SYM_OPS:
            values = [a.value if isinstance(a, _Arg) else a for a in args]
            exprs = [v.expr if isinstance(v, _Sym) else v for v in values]
            value = sympy.floor(exprs[0] / exprs[1]) if target is operator.floordiv else target(*exprs)
            return _Sym(sympy.sympify(value))
        if target is operator.getitem:
            (_, container), index = args
            if isinstance(container, (_Split, _Full)):
                raise PositionSplitError(f"{node.name}: indexing a tensor by getitem")
            return container[index]
        if not isinstance(target, torch._ops.OpOverload):
            raise PositionSplitError(f"{node.name}: {target} is not an aten op")
        operands = [(n, v) for n, v in _tensor_args(args, kwargs) if isinstance(v, (_Split, _Full))]
        if not operands:  # constants (and sizes at every position)
            return self._wrap(node, self._run(target, args, kwargs, "full"), shared=True)
        if target in _MATMUL or target is aten.linear.default:
            return self._matmul(node, target, args, kwargs)
        mixed = self._mixed_dims(node, target, args)
        splits = [(n, v) for n, v in operands if isinstance(v, _Split)]
        fulls = [(n, v) for n, v in operands if isinstance(v, _Full)]
        replace: dict[int, Any] = {}
        for arg_node, value in operands:
            dims = mixed.get(arg_node.name, ())
            seq_dims, batch_dims, merged = self._dims(arg_node)
            if set(dims) & set(batch_dims + merged):
                raise PositionSplitError(f"{node.name}: {target} mixes the batch")
            if set(dims) & set(seq_dims):
                if target in _CONCAT or target in _SPLITS:
                    raise PositionSplitError(f"{node.name}: concatenates or splits positions")
                if isinstance(value, _Split):
                    replace[id(value)] = self._join(arg_node, value)
                elif self._last_dims(arg_node, value.tensor) & set(dims):
                    raise PositionSplitError(f"{node.name}: mixes positions of a last-position-only value")
        if replace:
            args, kwargs = _replace(args, replace), _replace(kwargs, replace)
            return self._call_values(node, target, args, kwargs)
        if splits and any(self._last_dims(n, v.tensor) for n, v in fulls):
            restrict = {id(v): _Full(v.last, depends=True) for _, v in splits}
            args, kwargs = _replace(args, restrict), _replace(kwargs, restrict)
        return self._call_values(node, target, args, kwargs)

    def _call_values(self, node: fx.Node, target: Any, args: Any, kwargs: Any) -> Any:
        """Run ``target`` per part when any operand is split, else on full values."""
        operands = [(n, v) for n, v in _tensor_args(args, kwargs) if isinstance(v, (_Split, _Full))]
        if any(isinstance(v, _Split) for _, v in operands):
            if not (torch.Tag.pointwise in target.tags or target in _POINTWISE_EXTRA
                    or _is_layout_op(target) or torch.Tag.reduction in target.tags
                    or target in _SOFTMAX or target in _CONCAT or target in _SPLITS
                    or target in (aten.slice.Tensor, aten.select.int) or target in _MATMUL
                    or target is aten.linear.default):
                raise PositionSplitError(f"{node.name}: {target} is not known to act position by position")
            if _is_reshape(target):
                self._check_reshape(node, args)
            try:
                converted = [(self._part_args(args, p), self._part_args(kwargs, p)) for p in PARTS]
            except _NotShared:  # an operand depends on the last position: so does the result
                restrict = {id(v): _Full(v.last, depends=True) for _, v in operands if isinstance(v, _Split)}
                return self._call_values(node, target, _replace(args, restrict), _replace(kwargs, restrict))
            parts = [self._run(target, a, k, p) for (a, k), p in zip(converted, PARTS, strict=True)]
            if isinstance(parts[0], (list, tuple)):
                return [_Split(p, q) for p, q in zip(parts[0], parts[1], strict=True)]
            return _Split(*parts)
        if torch.Tag.pointwise in target.tags:
            args, kwargs = self._align_last(node, args, kwargs)
            operands = [(n, v) for n, v in _tensor_args(args, kwargs) if isinstance(v, _Full)]
        depends = any(v.depends for _, v in operands)
        states = {self._state(n, v.tensor) for n, v in operands} - {"none"}
        if _has_sizes(args, kwargs) and (len(states) > 1 or "mixed" in states):
            raise PositionSplitError(f"{node.name}: sizes of a value with some positions last-only")
        mode = "last" if states & {"last", "mixed"} else "full"
        result = self._run(target, _values(args), _values(kwargs), mode)
        if isinstance(result, (list, tuple)):  # computed values are checked when split
            return [_Full(r, depends=depends) for r in result]
        return self._wrap(node, result, depends=depends)

    def _matmul(self, node: fx.Node, target: Any, args: Any, kwargs: Any) -> Any:
        """Matmuls: per part when one side is a parameter; when both sides carry positions, the
        contracted positions (keys) joined, a left operand's rows (queries) at the last position
        only, a right operand's columns (keys) joined."""
        pairs = _tensor_args(args, {})
        positional = [isinstance(v, (_Split, _Full)) for _, v in pairs]
        if target is aten.linear.default:
            if any(positional[1:]):
                raise PositionSplitError(f"{node.name}: a linear map with computed weights")
            seq, _, merged = self._dims(pairs[0][0])
            if len(self._shape(pairs[0][0])) - 1 in seq + merged:
                raise PositionSplitError(f"{node.name}: a linear map over positions")
            return self._call_values(node, target, args, kwargs)
        if target is aten.addmm.default and positional[0]:
            raise PositionSplitError(f"{node.name}: addmm with a computed bias")
        left, right = pairs[-2], pairs[-1]
        l_nd, r_nd = len(self._shape(left[0])), len(self._shape(right[0]))
        if l_nd < 2 or r_nd < 2:
            raise PositionSplitError(f"{node.name}: a matmul of vectors")
        both = positional[-2] and positional[-1]
        replace: dict[int, Any] = {}
        for (arg, value), contracted, outer in ((left, l_nd - 1, l_nd - 2), (right, r_nd - 2, r_nd - 1)):
            if not isinstance(value, (_Split, _Full)):
                continue
            seq, batch, merged = self._dims(arg)
            if contracted in batch + merged:
                raise PositionSplitError(f"{node.name}: contracts the batch")
            if contracted in seq:
                if isinstance(value, _Split):
                    replace[id(value)] = self._join(arg, value)
                elif contracted in self._last_dims(arg, value.tensor):
                    raise PositionSplitError(f"{node.name}: contracts a last-position-only value's positions")
            elif both and outer in seq and isinstance(value, _Split):
                # queries keep the last position; keys need every position
                replace[id(value)] = _Full(value.last, depends=True) if arg is left[0] \
                    else self._join(arg, value)
        args = _replace(args, replace)
        values = [v for _, v in _tensor_args(args, kwargs)]
        if any(isinstance(v, _Split) for v in values) and any(isinstance(v, _Full) for v in values):
            raise PositionSplitError(f"{node.name}: a matmul of a split and a full value")
        return self._call_values(node, target, args, kwargs)

    def _mixed_dims(self, node: fx.Node, target: Any, args: Any) -> dict[str, tuple[int, ...]]:
        """For each tensor operand, the dims ``target`` mixes (reduces, normalises, indexes)."""
        values = list(args)
        first = values[0] if values and isinstance(values[0], _Arg) else None
        if target in _CONCAT:
            tensors = [t for t in values[0] if isinstance(t, _Arg)]
            dim = values[1] if len(values) > 1 else node.kwargs.get("dim", 0)
            if target is aten.stack.default:  # a new dimension: nothing is mixed
                return {}
            return {n.name: (_norm(dim, len(self._shape(n))),) for n, _ in tensors}
        if first is None:
            return {}
        ndim = len(self._shape(first[0]))
        if target in _SOFTMAX:
            return {first[0].name: (_norm(values[1], ndim),)}
        if torch.Tag.reduction in target.tags:
            dims = values[1] if len(values) > 1 else node.kwargs.get("dim")
            if dims is None or dims == []:
                return {first[0].name: tuple(range(ndim))}
            dims = [dims] if isinstance(dims, int) else dims
            return {first[0].name: tuple(_norm(d, ndim) for d in dims)}
        if target in (aten.slice.Tensor, aten.select.int) or target in _SPLITS:
            where = 2 if target in _SPLITS and target is not aten.unbind.int else 1  # the dim argument
            dim = _norm(values[where] if len(values) > where else node.kwargs.get("dim", 0), ndim)
            if target is aten.slice.Tensor:
                start = values[2] if len(values) > 2 else None
                end = values[3] if len(values) > 3 else None
                step = values[4] if len(values) > 4 else 1
                whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) \
                    and step == 1
                return {} if whole else {first[0].name: (dim,)}
            return {first[0].name: (dim,)}
        return {}

    def _align_last(self, node: fx.Node, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """Pointwise ops on full values: where one operand holds the last position only along a
        dimension, the others are narrowed to it (broadcasting aligns dims from the right)."""
        operands = [(n, v) for n, v in _tensor_args(args, kwargs) if isinstance(v, _Full)]
        out_nd = len(self._shape(node) or ())
        last_out: set[int] = set()
        for n, v in operands:
            nd = v.tensor.dim()
            last_out |= {d + out_nd - nd for d in self._last_dims(n, v.tensor)}
        if not last_out:
            return args, kwargs
        replace: dict[int, Any] = {}
        for n, v in operands:
            nd, tensor = v.tensor.dim(), v.tensor
            for d in self._dims(n)[0]:
                if d + out_nd - nd in last_out and tensor.shape[d] == self.length:
                    tensor = tensor.narrow(d, self.length - 1, 1)
            if tensor is not v.tensor:
                replace[id(v)] = _Full(tensor, v.shared, v.depends)
        return _replace(args, replace), _replace(kwargs, replace)

    def _check_reshape(self, node: fx.Node, args: Any) -> None:
        """A reshape acts per position when positions keep their place in memory: the same
        extent after the sequence dimension on both sides, the batch (if a dimension of its own)
        before it, and batch·sequence dims batch-major (what flattening [batch, seq, …] gives)."""
        extents = []
        for side in (args[0][0], node):
            shape = self._shape(side)
            seq_dims, batch_dims, merged = self._dims(side)
            if len(seq_dims + merged) != 1 or any(b > (seq_dims + merged)[0] for b in batch_dims):
                raise PositionSplitError(f"{node.name}: a reshape that moves positions")
            extents.append(sympy.Mul(*shape[(seq_dims + merged)[0] + 1:]))
        if sympy.simplify(extents[0] - extents[1]) != 0:
            raise PositionSplitError(f"{node.name}: a reshape that moves positions")

    # ------------------------------------------------------------------ evaluation
    def _sizes(self, part: str) -> dict[sympy.Symbol, int]:
        if part == "prefix":
            return {self.batch: len(self.groups), self.seq: self.length - 1}
        if part == "last":
            return {self.batch: self.contexts, self.seq: 1}
        return {self.batch: self.contexts, self.seq: self.length}

    def _part_args(self, tree: Any, part: str) -> Any:
        """``tree`` with each argument's value for ``part`` (its earlier or last positions)."""
        def convert(item: Any) -> Any:
            if not isinstance(item, _Arg):
                return item
            node, value = item
            if isinstance(value, _Split):
                return value.prefix if part == "prefix" else value.last
            if isinstance(value, _Full):
                if value.depends and not value.shared:
                    raise _NotShared(f"{node.name} depends on the last position")
                prefix, last = self._parts(node, value.tensor, value.shared) \
                    if self._unmerged(node)[0] else self._batch_parts(node, value.tensor)
                return prefix if part == "prefix" else last
            return value
        return pytree.tree_map(convert, tree)

    def _batch_parts(self, node: fx.Node, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A value without positions (per context or shared): per group and per context."""
        prefix = tensor
        for dim in self._unmerged(node)[1]:
            if tensor.shape[dim] == self.contexts:
                prefix = prefix.index_select(dim, self.groups.first)
                self._claim(node, prefix.index_select(dim, self.groups.inverse), tensor)
        return prefix, tensor

    def _run(self, target: Any, args: Any, kwargs: Any, part: str) -> Any:
        sizes = self._sizes(part)
        key = (sizes[self.batch], sizes[self.seq])

        def concrete(item: Any) -> Any:
            if isinstance(item, _Arg):
                return pytree.tree_map(concrete, item.value)
            if isinstance(item, _Sym):
                if (item.expr, *key) not in self._sizes_of:
                    value = item.expr.subs(sizes)
                    if not value.is_Integer:
                        raise PositionSplitError(f"a size {item.expr} is not a whole number here")
                    self._sizes_of[(item.expr, *key)] = int(value)
                return self._sizes_of[(item.expr, *key)]
            if isinstance(item, _Full):
                return item.tensor
            return item
        args, kwargs = pytree.tree_map(concrete, (args, kwargs))
        return target(*args, **kwargs)

    def _wrap(self, node: fx.Node, result: Any, shared: bool = False, depends: bool = False) -> Any:
        if isinstance(result, torch.Tensor):
            shape = self._shape(node)
            positional = shape is not None and any(
                getattr(e, "free_symbols", set()) & {self.batch, self.seq} for e in shape)
            return _Full(result, shared, depends) if positional else result
        return result


# ---------------------------------------------------------------------- helpers
def _recorded_shape(node: fx.Node) -> list[sympy.Expr] | None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return [sympy.sympify(s.node.expr) if isinstance(s, torch.SymInt) else sympy.Integer(int(s))
            for s in value.shape]


def _meta_expr(node: fx.Node) -> sympy.Expr:
    value = node.meta.get("val")
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return sympy.Integer(int(value))


def _first_placeholder(nodes: list[fx.Node]) -> fx.Node:
    return next(n for n in nodes if n.op == "placeholder")


def _first_output_node(nodes: list[fx.Node]) -> fx.Node:
    output = nodes[-1].args[0]
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def _attr(module: torch.nn.Module, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int}


def _is_reshape(target: Any) -> bool:
    return target in _RESHAPES


def _is_layout_op(target: Any) -> bool:
    """Ops that move dimensions without mixing elements of different positions."""
    return target in _RESHAPES or target in (
                      aten.expand.default, aten.permute.default, aten.transpose.int,
                      aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                      aten.contiguous.default, aten.t.default)


class _SplitInterpreter(fx.Interpreter):
    """The unit's graph run node by node on split values (:meth:`LastPosition._run_node`)."""

    def __init__(self, owner: LastPosition, weights: Sequence[torch.Tensor] | None) -> None:
        super().__init__(owner.graph_module, garbage_collect_values=True)
        self.extra_traceback = False  # errors are PositionSplitErrors with their own message
        self.owner = owner
        self.attrs = iter(weights) if weights is not None else None

    def run_node(self, n: fx.Node) -> Any:
        return self.owner._run_node(n, self.env, self.args_iter, self.attrs)


def _tensor_args(args: Any, kwargs: Any) -> list[_Arg]:
    """The arguments that are values of nodes, in order."""
    return [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, _Arg)]


def _replace(tree: Any, replace: Mapping[int, Any]) -> Any:
    """``tree`` with each argument's value swapped where ``replace`` names it (by identity)."""
    return pytree.tree_map(lambda item: _Arg(item.node, replace.get(id(item.value), item.value))
                           if isinstance(item, _Arg) else item, tree)


def _values(tree: Any) -> Any:
    """``tree`` with each argument replaced by its value."""
    return pytree.tree_map(lambda item: item.value if isinstance(item, _Arg) else item, tree)


def _has_sizes(args: Any, kwargs: Any) -> bool:
    """Whether any argument is a symbolic size."""
    return any(isinstance(leaf.value if isinstance(leaf, _Arg) else leaf, _Sym)
               for leaf in pytree.tree_leaves((args, kwargs)))
