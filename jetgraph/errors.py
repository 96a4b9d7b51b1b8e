"""Exceptions raised by jetgraph. Every message names what went wrong and what is supported."""

from __future__ import annotations


class JetgraphError(Exception):
    """Base class of every error jetgraph raises on purpose."""


class CaptureError(JetgraphError):
    """A model could not be captured or lifted into a residual program.

    Carries the model class and, where known, the module path and graph node where it failed.
    """

    def __init__(
        self,
        message: str,
        *,
        model_class: str | None = None,
        module: str | None = None,
        node: str | None = None,
    ) -> None:
        self.model_class = model_class
        self.module = module
        self.node = node
        where = []
        if model_class:
            where.append(f"model {model_class}")
        if module:
            where.append(f"module '{module}'")
        if node:
            where.append(f"node '{node}'")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)


class ModelLoadError(JetgraphError):
    """A model name or path could not be resolved to a loadable causal LM."""


class JetRuleError(JetgraphError):
    """An op has no Taylor-mode rule."""


class CostError(JetgraphError):
    """Planned work is past a limit (time, memory, terms); the message holds the estimate and the
    option that lifts the limit."""
