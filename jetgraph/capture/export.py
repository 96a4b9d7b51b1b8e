"""Model in, FX graph out: ``torch.export`` of an ``(input_ids, attention_mask) -> logits`` wrapper.

The wrapper hands a Hugging Face model the attention mask and the position ids it implies
(:func:`jetgraph.padding.positions_from_mask`), so that a padded prompt sees the positions it has
alone. The graph is exported with a dynamic batch and sequence length where the model allows it,
lowered to the core op set the Taylor rules cover (:mod:`jetgraph.taylor.lowering`), each node's
module scope recorded in ``node.meta``, and checked against the eager model before it is handed
to the lift pass. Failures become :class:`jetgraph.CaptureError` naming the module that failed.
"""

from __future__ import annotations

import inspect
import re
import traceback
import types
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from jetgraph.capture.config_facts import context_length
from jetgraph.errors import CaptureError
from jetgraph.ir import MODULE_SCOPE
from jetgraph.padding import as_attention_mask, full_mask, positions_from_mask
from jetgraph.precision import capture_tolerance
from jetgraph.taylor.lowering import core_module

SUPPORTED = (
    "jetgraph captures pre-LN residual causal LMs whose forward maps input_ids to logits "
    "(GPT-2, GPT-Neo, GPT-NeoX/Pythia, GPT-J, Llama, Mistral, Qwen2, Gemma, OPT pre-LN, Phi, ...) "
    "and plain torch modules of the form h = h + f(h) that take a LongTensor of token ids"
)

# Ops that only assert or guard; they have no users and carry no computation.
_ASSERT_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


class LogitsWrapper(nn.Module):
    """``(input_ids, attention_mask) -> logits`` around a Hugging Face causal LM or a plain module.

    The mask goes to every forward that has an ``attention_mask`` parameter, and position ids
    counted over the real tokens to every forward that has ``position_ids`` and whose own
    default positions are those (:meth:`check_positions`: RoBERTa-style models start counting
    at ``padding_idx + 1``, and keep their own); a forward without a mask parameter gets the ids
    alone (``reads_mask`` is then False).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model
        self.is_hf = hasattr(model, "config") and hasattr(model, "generation_config")
        parameters = _parameters(model)
        self.reads_mask = "attention_mask" in parameters
        self.takes_positions = "position_ids" in parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, object] = {"use_cache": False} if self.is_hf else {}
        if self.reads_mask:
            kwargs["attention_mask"] = attention_mask
        if self.takes_positions:
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        out = self.m(input_ids, **kwargs)
        return _logits(out)

    def check_positions(self, input_ids: torch.Tensor) -> None:
        """Pass position ids only if, unpadded, they give what the model's own defaults give."""
        if not self.takes_positions:
            return
        mask = full_mask(input_ids)
        with torch.no_grad():
            ours = self(input_ids, mask)
            self.takes_positions = False
            default = self(input_ids, mask)
        if not isinstance(ours, torch.Tensor) or not isinstance(default, torch.Tensor):
            return
        tolerance = capture_tolerance(default.dtype) * max(1.0, default.float().abs().max().item())
        same = ours.shape == default.shape
        self.takes_positions = same and (ours.float() - default.float()).abs().max().item() <= tolerance


def _logits(out: object) -> object:
    """The logits of a forward's output (``.logits``, the first of a tuple, or the tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@dataclass
class CapturedGraph:
    """A decomposed FX graph of ``(input_ids, attention_mask) -> logits`` plus what lift needs."""

    graph_module: fx.GraphModule
    model_class: str
    dynamic: bool
    example_input_ids: torch.Tensor
    reference_logits: torch.Tensor
    reads_mask: bool = True
    example_attention_mask: torch.Tensor | None = None
    max_positions: int | None = None
    passes_positions: bool = False  # the wrapper gave the model position ids (check_positions)
    fixed_sizes: tuple[int | None, int | None] = (None, None)  # (batch, seq) the export fixed

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def export_model(model: nn.Module, example_input_ids: torch.Tensor,
                 example_attention_mask: torch.Tensor | None = None) -> CapturedGraph:
    """Export ``model`` on ``example_input_ids`` (shape [batch, seq]) and decompose it; the
    example's logits (under ``example_attention_mask``, if given) are what lift must reproduce."""
    model_class = type(model).__name__
    ids = _check_input_ids(example_input_ids, model_class)
    wrapper = LogitsWrapper(model)
    try:
        mask = as_attention_mask(example_attention_mask, ids, reads_mask=wrapper.reads_mask)
    except (TypeError, ValueError) as exc:
        raise CaptureError(f"example attention mask: {exc}", model_class=model_class) from None
    model.eval()
    try:
        wrapper.check_positions(ids)
    except Exception as exc:  # the model itself cannot run on this input
        raise _capture_error(exc, model, "the model's forward failed on the example input") from exc
    export_ids = _export_example(ids)
    export_inputs = (export_ids, full_mask(export_ids))
    with torch.no_grad():
        try:
            reference = wrapper(ids, mask)
        except Exception as exc:  # the model itself cannot run on this input
            raise _capture_error(exc, model, "the model's forward failed on the example input") from exc
        if not isinstance(reference, torch.Tensor) or reference.dim() != 3:
            raise CaptureError(
                f"the forward returned {type(reference).__name__} "
                f"{getattr(reference, 'shape', '')}, not logits of shape [batch, seq, vocab]. "
                + SUPPORTED,
                model_class=model_class,
            )
        exported, fixed_sizes = _export(wrapper, model, export_inputs, ids)
        try:
            graph_module = core_module(exported)
        except Exception as exc:
            raise _capture_error(exc, model, "lowering to the core op set failed") from exc
        _strip_asserts(graph_module)
        record_module_scopes(graph_module)
        _check_graph(graph_module, model, ids, mask, reference)
    return CapturedGraph(graph_module, model_class, fixed_sizes == (None, None), ids, reference,
                         wrapper.reads_mask, None if example_attention_mask is None else mask,
                         context_length(model), wrapper.takes_positions, fixed_sizes)


SYNTHETIC_LENGTH = 8


def synthetic_input_ids(model: nn.Module, length: int = SYNTHETIC_LENGTH) -> torch.Tensor:
    """A short example input for capture when none is given: ``length`` token ids spread over
    the vocabulary (seeded, so a capture is reproducible). The vocabulary size is read from the
    model's config or its input embedding; a model with neither needs explicit ids."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise CaptureError("cannot choose an example input: the model has no config.vocab_size and no "
                           "nn.Embedding; pass example_input_ids (a LongTensor [batch, seq])",
                           model_class=type(model).__name__)
    limit = context_length(model)
    if limit is not None:
        length = min(length, limit)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (1, length), generator=generator)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return ids.to(device)


def _check_input_ids(ids: torch.Tensor, model_class: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise CaptureError(
            f"example_input_ids must be a torch.LongTensor of shape [batch, seq], got {type(ids).__name__}",
            model_class=model_class,
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise CaptureError(
            "example_input_ids must be a non-empty integer tensor of shape [batch, seq], "
            f"got dtype {ids.dtype} and shape {tuple(ids.shape)}",
            model_class=model_class,
        )
    return ids.long()


def _export_example(ids: torch.Tensor) -> torch.Tensor:
    """An example with batch and sequence >= 2, so export does not specialise them to 1."""
    if ids.shape[0] < 2:
        ids = ids.expand(2, -1)
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 2)
    return ids.contiguous()


def _export(wrapper: nn.Module, model: nn.Module, export_inputs: tuple[torch.Tensor, torch.Tensor],
            ids: torch.Tensor) -> tuple[torch.export.ExportedProgram, tuple[int | None, int | None]]:
    """Export with a dynamic batch and sequence length, and say which sizes the graph really
    kept symbolic: ``fixed`` is (batch, seq), None where symbolic. Export may fix a size silently
    (a Python loop over the positions, as state-space models run without their kernels, is
    unrolled); when a fixed size is not the example's, the example itself is exported."""
    try:
        exported = torch.export.export(
            wrapper, export_inputs,
            dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}), strict=False)
    except Exception:
        exported = None
    if exported is not None:
        fixed = _fixed_sizes(exported)
        if all(size is None or size == ids.shape[d] for d, size in enumerate(fixed)):
            return exported, fixed
    try:
        static = torch.export.export(wrapper, (ids, full_mask(ids)), strict=False)
    except Exception as exc:
        raise _capture_error(exc, model, "torch.export failed") from exc
    return static, (int(ids.shape[0]), int(ids.shape[1]))


def _fixed_sizes(exported: torch.export.ExportedProgram) -> tuple[int | None, int | None]:
    """(batch, seq) of the first input as the export left them: None where symbolic, the size
    where export specialised it (a SymInt with a constant value, or an int)."""
    first = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name in
                 {spec.arg.name for spec in exported.graph_signature.input_specs
                  if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT})
    shape = first.meta["val"].shape
    return tuple(None if isinstance(size, torch.SymInt) and not is_concrete_int(size) else int(size)
                 for size in shape)  # type: ignore[return-value]


def _check_graph(graph_module: fx.GraphModule, model: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, reference: torch.Tensor) -> None:
    """The functional, lowered graph must give the eager model's logits on the example (so a
    later failure of the lifted program is the lift's, not the export's)."""
    try:
        logits = graph_module(ids, mask)
    except Exception as exc:
        raise _capture_error(exc, model, "the exported graph does not run on the example") from exc
    relative = capture_tolerance(reference.dtype)
    tolerance = relative * max(1.0, reference.float().abs().max().item())
    same = isinstance(logits, torch.Tensor) and logits.shape == reference.shape
    error = (logits.float() - reference.float()).abs().max().item() if same else float("inf")
    if not error <= tolerance:
        raise CaptureError(
            f"the exported graph does not reproduce the model's logits (max abs error {error:.3g} > "
            f"{tolerance:.3g}): torch.export or the functionalisation of in-place ops changed the "
            "computation. " + SUPPORTED, model_class=type(model).__name__)


def _parameters(model: nn.Module) -> set[str]:
    """The names ``model.forward`` accepts (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _strip_asserts(graph_module: fx.GraphModule) -> None:
    """Drop guard and assert nodes: they have no users and no part in the computation."""
    graph = graph_module.graph
    for node in reversed(list(graph.nodes)):
        is_guard = node.op == "call_module" and str(node.target).startswith("_guards")
        if (is_guard or node.target in _ASSERT_OPS) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph_module.recompile()


def record_module_scopes(graph_module: fx.GraphModule) -> None:
    """Write each node's module path into ``node.meta`` (:data:`jetgraph.ir.MODULE_SCOPE`) once,
    so later layers read it without knowing about export's ``nn_module_stack`` or the wrapper."""
    for node in graph_module.graph.nodes:
        node.meta[MODULE_SCOPE] = traced_scope(node)


def traced_scope(node: fx.Node) -> str:
    """The innermost module path export recorded for ``node``, without the capture wrapper's prefix."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return strip_wrapper(list(stack.values())[-1][0])


def strip_wrapper(path: str) -> str:
    """A module path of the wrapped model: ``m.model.layers.0`` -> ``model.layers.0``."""
    if path == "m" or path.startswith("_empty_nn_module_stack"):
        return ""
    return path[2:] if path.startswith("m.") else path


def _capture_error(exc: BaseException, model: nn.Module, what: str) -> CaptureError:
    """Translate an export failure into a CaptureError naming the innermost failing module."""
    module = _failing_module(exc, model)
    match = re.search(r"While executing %(\w+)", str(exc))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CaptureError(
        f"{what}: {type(exc).__name__}: {first_line[:400]}. {SUPPORTED}. "
        "Common causes: data-dependent Python control flow on tensor values, or a forward that "
        "does not accept input_ids alone.",
        model_class=type(model).__name__,
        module=module,
        node=match.group(1) if match else None,
    )


def _failing_module(exc: BaseException, model: nn.Module) -> str | None:
    """The dotted name of the innermost submodule of ``model`` on the failing call stack."""
    names = {id(mod): name for name, mod in model.named_modules()}
    found: str | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb: types.TracebackType | None = current.__traceback__
        for frame, _ in traceback.walk_tb(tb):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                found = names[id(owner)] or type(model).__name__
        current = current.__cause__ or current.__context__
    return found
