"""Push truncated Taylor series through an FX graph, one rule per op.

An ``fx.Interpreter`` whose ``call_function`` evaluates constant nodes normally and dispatches
any node that touches a :class:`Series` to ``RULES[op]``. Ops without a rule raise
:class:`jetgraph.JetRuleError` naming the op, the node and its module.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from jetgraph.errors import JetRuleError
from jetgraph.ir import module_scope
from jetgraph.taylor.rules import rule_for
from jetgraph.taylor.series import Series, is_series


def _touches_series(value: Any) -> bool:
    found = False

    def visit(item: Any) -> Any:
        nonlocal found
        found = found or is_series(item)
        return item

    fx.node.map_aggregate(value, visit)
    return found


class JetInterpreter(fx.Interpreter):
    """Runs a GraphModule on series inputs (and constants), returning series outputs."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module, garbage_collect_values=True)
        self._node: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        self._node = node
        owned = self._mark_owned(node)
        try:
            return super().run_node(node)
        finally:
            for value in owned:
                value.owned = False

    def _mark_owned(self, node: fx.Node) -> list[Series]:
        """Series that die at ``node`` and share their buffer with no other live value.

        Their op may update them in place (``Series.owned``), which keeps peak memory near one
        series per live tensor. Graph inputs are never owned: they belong to the caller.
        """
        dying = [d for d in self.user_to_last_uses.get(node, ()) if d.op != "placeholder"]
        candidates = [self.env[d] for d in dying if isinstance(self.env.get(d), Series)]
        if not candidates:
            return []
        live: dict[int, int] = {}
        for value in self.env.values():
            for tensor in _tensors(value):
                key = tensor.untyped_storage()._cdata
                live[key] = live.get(key, 0) + 1
        owned = []
        for series in candidates:
            if series.coeffs.requires_grad and series.coeffs._is_view():
                continue  # autograd forbids writing into some views (split pieces)
            if _overlaps(series.coeffs):
                continue  # an expanded view: one element stands for many, no in-place write
            if live.get(series.coeffs.untyped_storage()._cdata, 0) == 1:
                series.owned = True
                owned.append(series)
        return owned

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not _touches_series(args) and not _touches_series(kwargs):
            return target(*args, **kwargs)
        rule = rule_for(target)
        if rule is None:
            raise self._missing(target)
        try:
            return rule(*args, **kwargs)
        except NotImplementedError as exc:
            raise self._missing(target, str(exc)) from exc

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _touches_series(args) or _touches_series(kwargs):
            raise self._missing(f"Tensor.{target}")
        return super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _touches_series(args) or _touches_series(kwargs):
            raise self._missing(f"module {target}")
        return super().call_module(target, args, kwargs)

    def _missing(self, target: Any, detail: str = "") -> JetRuleError:
        node = self._node
        module = (module_scope(node) if node is not None else "") or "?"
        reason = f" ({detail})" if detail else ""
        return JetRuleError(
            f"no Taylor rule for op {target} at node '{node.name if node else '?'}' in module "
            f"'{module}'{reason}. Add one in jetgraph/taylor/rules.py: a line with deflinear (linear "
            "ops), defzero (piecewise constant), defsympy (elementwise with a closed form) or "
            "RULES[op] = rule(*args) taking Series arguments"
        )


def _overlaps(tensor: Any) -> bool:
    """Whether several elements of ``tensor`` share memory (a zero stride on a longer axis, as
    ``expand`` makes): torch refuses in-place writes into such a tensor."""
    return any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape, strict=True))


def _tensors(value: Any) -> list[Any]:
    found: list[Any] = []

    def visit(item: Any) -> Any:
        if isinstance(item, Series):
            found.append(item.coeffs)
        elif hasattr(item, "untyped_storage"):
            found.append(item)
        return item

    fx.node.map_aggregate(value, visit)
    return found


def run_series(module: fx.GraphModule, *inputs: Series | Any) -> Any:
    """Evaluate ``module`` with series (and constant) inputs."""
    return JetInterpreter(module).run(*inputs)
