"""Push truncated Taylor series through an FX graph, one rule per op.

An ``fx.Interpreter`` whose ``call_function`` evaluates constant nodes normally and dispatches
any node that touches a :class:`Series` to ``RULES[op]``. Ops without a rule raise
:class:`jetgraph.JetRuleError` naming the op, the node and its module.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from jetgraph.errors import JetRuleError
from jetgraph.taylor.rules import RULES
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
        return super().run_node(node)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not _touches_series(args) and not _touches_series(kwargs):
            return target(*args, **kwargs)
        rule = RULES.get(target)
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
        stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
        module = list(stack.values())[-1][0] if stack else "?"
        module = module[2:] if module.startswith("m.") else module
        reason = f" ({detail})" if detail else ""
        return JetRuleError(
            f"no Taylor rule for op {target} at node '{node.name if node else '?'}' in module "
            f"'{module}'{reason}. Add one in jetgraph/taylor/rules.py: a line with deflinear (linear "
            "ops), defzero (piecewise constant), defsympy (elementwise with a closed form) or "
            "RULES[op] = rule(*args) taking Series arguments"
        )


def run_series(module: fx.GraphModule, *inputs: Series | Any) -> Any:
    """Evaluate ``module`` with series (and constant) inputs."""
    return JetInterpreter(module).run(*inputs)
