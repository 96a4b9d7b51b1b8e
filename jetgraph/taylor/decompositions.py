"""Decompositions that lower captured graphs to jetgraph's small core op set.

Normalisations become mean/sub/mul/rsqrt and attention becomes matmul/softmax/matmul, so that
every later layer (Taylor rules, codegen) sees a handful of primitive ops. PyTorch's own
higher-order derivatives through ``native_layer_norm`` are wrong, and CPU SDPA has no
forward-mode rule: decomposing here sidesteps both.

Each decomposition is written once against an ``emit(op, *args)`` callback: the lowering pass
passes one that appends FX nodes; :func:`eager` passes one that runs the op, which is how the
decompositions are tested against torch's own kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from jetgraph.precision import is_half

aten = torch.ops.aten

Emit = Callable[..., Any]
Shape = Callable[[Any], Sequence[int]]


def _upcast(emit: Emit, x: Any) -> tuple[Any, torch.dtype | None]:
    """``x`` in float32 if it is a 16-bit float, and the dtype to cast the result back to:
    norms' statistics and softmax are computed in float32 for half inputs, as torch's own
    kernels do (their reductions accumulate in float32)."""
    dtype = _dtype(x)
    if dtype is not None and is_half(dtype):
        return emit(aten._to_copy.default, x, dtype=torch.float32), dtype
    return x, None


def _downcast(emit: Emit, y: Any, dtype: torch.dtype | None) -> Any:
    return y if dtype is None else emit(aten._to_copy.default, y, dtype=dtype)


def layer_norm(emit: Emit, shape: Shape, x: Any, normalized_shape: Sequence[int],
               weight: Any = None, bias: Any = None, eps: float = 1e-5,
               cudnn_enable: bool = False) -> Any:
    """LayerNorm as mean, centring, mean of squares and rsqrt (in float32 for half inputs)."""
    x, half = _upcast(emit, x)
    dims = list(range(-len(normalized_shape), 0))
    centered = emit(aten.sub.Tensor, x, emit(aten.mean.dim, x, dims, True))
    variance = emit(aten.mean.dim, emit(aten.mul.Tensor, centered, centered), dims, True)
    y = emit(aten.mul.Tensor, centered, emit(aten.rsqrt.default, emit(aten.add.Tensor, variance, eps)))
    if weight is not None:
        y = emit(aten.mul.Tensor, y, weight)
    if bias is not None:
        y = emit(aten.add.Tensor, y, bias)
    return _downcast(emit, y, half)


def rms_norm(emit: Emit, shape: Shape, x: Any, normalized_shape: Sequence[int],
             weight: Any = None, eps: float | None = None) -> Any:
    """RMSNorm as mean of squares and rsqrt (eps defaults to float32's epsilon, as in torch; in
    float32 for half inputs)."""
    x, half = _upcast(emit, x)
    dims = list(range(-len(normalized_shape), 0))
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    mean_square = emit(aten.mean.dim, emit(aten.mul.Tensor, x, x), dims, True)
    y = emit(aten.mul.Tensor, x, emit(aten.rsqrt.default, emit(aten.add.Tensor, mean_square, eps)))
    if weight is not None:
        y = emit(aten.mul.Tensor, y, weight)
    return _downcast(emit, y, half)


def scaled_dot_product_attention(emit: Emit, shape: Shape, query: Any, key: Any, value: Any,
                                 attn_mask: Any = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Any:
    """Attention as matmul, mask, softmax, matmul (the math backend's definition; the softmax in
    float32 for half inputs). A query row whose mask hides every key (a left pad's row under a
    padding mask) gets zero weights, as torch's safe softmax gives, not the NaN of a softmax over
    -inf: that NaN would reach the real tokens through the next layer's values (0·NaN)."""
    if dropout_p != 0.0:
        raise NotImplementedError("jetgraph captures inference graphs: dropout_p must be 0")
    q_shape, k_shape = shape(query), shape(key)
    scale = 1.0 / math.sqrt(q_shape[-1]) if scale is None else scale
    if enable_gqa and k_shape[-3] != q_shape[-3]:
        repeats = q_shape[-3] // k_shape[-3]
        key = emit(aten.repeat_interleave.self_int, key, repeats, -3)
        value = emit(aten.repeat_interleave.self_int, value, repeats, -3)
    scores = emit(aten.mul.Tensor, emit(aten.matmul.default, query,
                                        emit(aten.transpose.int, key, -2, -1)), scale)
    if is_causal:
        rows = emit(aten.sym_size.int, query, len(q_shape) - 2)
        cols = emit(aten.sym_size.int, key, len(k_shape) - 2)
        ones = emit(aten.ones.default, [rows, cols], dtype=torch.bool)
        keep = emit(aten.tril.default, ones)
        scores = emit(aten.masked_fill.Scalar, scores, emit(aten.logical_not.default, keep),
                      float("-inf"))
    hidden_rows = None  # [..., q, 1] bool: rows whose mask hides every key
    if attn_mask is not None:
        if _dtype(attn_mask) == torch.bool:
            scores = emit(aten.masked_fill.Scalar, scores,
                          emit(aten.logical_not.default, attn_mask), float("-inf"))
            hidden_rows = emit(aten.logical_not.default, emit(aten.any.dim, attn_mask, -1, True))
        else:
            scores = emit(aten.add.Tensor, scores, attn_mask)
            hidden = emit(aten.eq.Scalar, attn_mask, float("-inf"))
            hidden_rows = emit(aten.all.dim, hidden, -1, True)
    scores, half = _upcast(emit, scores)
    weights = emit(aten._softmax.default, scores, -1, False)
    if hidden_rows is not None:
        weights = emit(aten.masked_fill.Scalar, weights, hidden_rows, 0.0)
    return emit(aten.matmul.default, _downcast(emit, weights, half), value)


def copy(emit: Emit, shape: Shape, target: Any, source: Any, non_blocking: bool = False) -> Any:
    """``copy(self, src)`` (what functionalising ``copy_`` gives): src cast to self's dtype and
    broadcast to self's shape. As plain ops it has forward-mode AD, which ``aten.copy`` lacks."""
    dtype = _dtype(target)
    if dtype is not None and _dtype(source) != dtype:
        source = emit(aten._to_copy.default, source, dtype=dtype)
    target_shape = list(shape(target))
    if list(shape(source)) == target_shape:
        return source
    sizes = [size if isinstance(size, int) else emit(aten.sym_size.int, target, dim)
             for dim, size in enumerate(target_shape)]
    return emit(aten.expand.default, source, sizes)


def _dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.Tensor):
        return value.dtype
    val = getattr(value, "meta", {}).get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten.layer_norm.default: layer_norm,
    aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    aten.copy.default: copy,
}
if hasattr(aten, "rms_norm"):
    DECOMPOSITIONS[aten.rms_norm.default] = rms_norm


def eager(decomposition: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run a decomposition on real tensors (for tests against torch's kernels)."""

    def emit(op: Any, *op_args: Any, **op_kwargs: Any) -> Any:
        if op is aten.ones.default:
            op_kwargs.setdefault("device", args[0].device)
        return op(*op_args, **op_kwargs)

    return decomposition(emit, lambda t: t.shape, *args, **kwargs)
