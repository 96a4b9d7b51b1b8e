"""Codegen: lower expansions to batched, straight-line torch code (a GraphModule or a .py file).

:func:`plan` (:mod:`.schedule`) groups an expansion's nodes into batched steps,
:class:`BatchedRun` (:mod:`.execute`) executes them, :func:`emit` (:mod:`.trace`) traces that into
one aten-level GraphModule (re-fusing decomposed kernels, :mod:`.fuse`) and :func:`emit_source`
(:mod:`.source`) prints it as a standalone module.
"""

from jetgraph.codegen.execute import BatchedRun
from jetgraph.codegen.schedule import Schedule, Step, plan
from jetgraph.codegen.source import CodegenError, emit_source
from jetgraph.codegen.trace import emit

__all__ = ["BatchedRun", "CodegenError", "Schedule", "Step", "emit", "emit_source", "plan"]
