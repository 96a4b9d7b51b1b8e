"""Passes: pure functions over captured graphs, the residual IR and expansions."""

from jetgraph.passes.lift import lift

__all__ = ["lift"]
