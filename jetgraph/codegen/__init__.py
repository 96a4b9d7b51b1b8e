"""Codegen: lower expansions to batched, straight-line torch code (a GraphModule or a .py file).

``plan`` groups an expansion's DAG into batched steps, ``BatchedRun`` executes them, ``emit`` traces
that into one aten-level GraphModule and ``emit_source`` prints it as a standalone module.
"""

from jetgraph.codegen.emit import emit
from jetgraph.codegen.execute import BatchedRun
from jetgraph.codegen.schedule import Schedule, Step, plan
from jetgraph.codegen.source import CodegenError, emit_source

__all__ = [
    "BatchedRun", "CodegenError", "Schedule", "Step", "emit", "emit_source", "plan",
]
