"""Re-fuse decomposed forward ops in emitted graphs.

Capture decomposes LayerNorm (so the Taylor rules see mean, sub, rsqrt, …) and models such as
GPT-2 spell GELU out as a tanh polynomial. Where the emitted code evaluates such a piece at order 0
(the unit applied to a centre, and the model's own stream), the decomposed form is 7–9 elementwise
passes over memory; this pass puts back the fused aten kernel. Only exact pattern matches are
rewritten; Taylor-mode code never matches.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

aten = torch.ops.aten


def fuse(graph: fx.Graph) -> dict[str, int]:
    """Rewrite fusable patterns in place; returns how many of each were fused."""
    counts = {"layer_norm": 0, "gelu_tanh": 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.graph is None:
            continue
        if _fuse_gelu_tanh(graph, node):
            counts["gelu_tanh"] += 1
        elif _fuse_layer_norm(graph, node):
            counts["layer_norm"] += 1
    if any(counts.values()):
        graph.eliminate_dead_code()
    return counts


def _call(value: object, op: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_function" and value.target == op


def _close(value: object, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(
        value, expected, rel_tol=1e-6)


def _operands(node: fx.Node, predicate) -> tuple[object, object] | None:
    """(matching operand, other operand) of a binary commutative op, or None."""
    a, b = node.args[0], node.args[1]
    if predicate(a):
        return a, b
    if predicate(b):
        return b, a
    return None


def _fuse_gelu_tanh(graph: fx.Graph, root: fx.Node) -> bool:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))  →  gelu(x, approximate="tanh")."""
    if not _call(root, aten.mul.Tensor):
        return False
    pair = _operands(root, lambda n: _call(n, aten.add.Tensor) and _close(n.args[1], 1.0)
                     and _call(n.args[0], aten.tanh.default))
    if pair is None:
        return False
    one_plus_tanh, half_x = pair
    if not (_call(half_x, aten.mul.Tensor) and _close(half_x.args[1], 0.5)):
        return False
    x = half_x.args[0]
    scaled = one_plus_tanh.args[0].args[0]
    if not (_call(scaled, aten.mul.Tensor) and _close(scaled.args[1], math.sqrt(2 / math.pi))):
        return False
    inner = scaled.args[0]
    if not (_call(inner, aten.add.Tensor) and inner.args[0] is x):
        return False
    cubic = inner.args[1]
    if not (_call(cubic, aten.mul.Tensor) and _close(cubic.args[1], 0.044715)
            and _call(cubic.args[0], aten.pow.Tensor_Scalar) and cubic.args[0].args[0] is x
            and _close(cubic.args[0].args[1], 3.0)):
        return False
    with graph.inserting_before(root):
        fused = graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
    _replace(root, fused)
    return True


def _fuse_layer_norm(graph: fx.Graph, root: fx.Node) -> bool:
    """(x − E x)·rsqrt(E(x − E x)² + ε)·w + b  →  native_layer_norm over the last dim.

    ``root`` is the rsqrt's normalising product; a following affine weight and bias (constants
    of the last dim's size) are folded in too.
    """
    if not _call(root, aten.mul.Tensor):
        return False
    pair = _operands(root, lambda n: _call(n, aten.rsqrt.default))
    if pair is None:
        return False
    rsqrt, centered = pair
    if not (_call(centered, aten.sub.Tensor) and _call(centered.args[1], aten.mean.dim)):
        return False
    x, mean = centered.args
    if not (mean.args[0] is x and _last_dim(mean)):
        return False
    shifted = rsqrt.args[0]
    if not (_call(shifted, aten.add.Tensor) and isinstance(shifted.args[1], float)):
        return False
    variance = shifted.args[0]
    if not (_call(variance, aten.mean.dim) and _last_dim(variance)):
        return False
    square = variance.args[0]
    if not (_call(square, aten.mul.Tensor) and square.args[0] is centered and square.args[1] is centered):
        return False
    width = _width(x)
    if width is None:
        return False
    last, weight, bias = root, None, None
    users = list(last.users)
    dtype = _dtype(x)  # an affine weight of another dtype (a bf16 model's upcast norm) stays unfused:
    # native_layer_norm takes no mixed dtypes on CPU
    if len(users) == 1 and _call(users[0], aten.mul.Tensor) and _is_vector(users[0].args[1], width) \
            and users[0].args[0] is last and _dtype(users[0].args[1]) == dtype:
        last, weight = users[0], users[0].args[1]
        users = list(last.users)
        if len(users) == 1 and _call(users[0], aten.add.Tensor) and users[0].args[0] is last \
                and _is_vector(users[0].args[1], width) and _dtype(users[0].args[1]) == dtype:
            last, bias = users[0], users[0].args[1]
    with graph.inserting_before(last):
        norm = graph.call_function(aten.native_layer_norm.default,
                                   (x, [width], weight, bias, shifted.args[1]))
        fused = graph.call_function(operator.getitem, (norm, 0))
    _replace(last, fused)
    return True


def _last_dim(mean: fx.Node) -> bool:
    dims = mean.args[1] if len(mean.args) > 1 else None
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    return list(dims or []) == [-1] and bool(keep)


def _value(node: fx.Node) -> object:
    """The node's example value: its traced ``val``, or for a constant the tensor itself."""
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        module = node.graph.owning_module
        value = getattr(module, node.target, None) if module is not None else None
    return value


def _dtype(node: object) -> torch.dtype | None:
    value = _value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _width(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return int(value.shape[-1])
    return None


def _is_vector(node: object, width: int) -> bool:
    """A constant (get_attr) of shape [width]: an affine LayerNorm parameter."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    value = _value(node)
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (width,)


def _replace(old: fx.Node, new: fx.Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})
    old.replace_all_uses_with(new)
