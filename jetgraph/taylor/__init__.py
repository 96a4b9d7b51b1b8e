"""Taylor-mode arithmetic: truncated series, op rules, an FX interpreter and ``jet``.

The layer also owns the op set its rules cover: :mod:`.lowering` (with :mod:`.decompositions`)
rewrites exported graphs into it, for model capture and for ``jet`` on any traceable function.
"""

from jetgraph.taylor.api import Jet, jet, trace_callable
from jetgraph.taylor.basis import MAX_ORDER, Basis, check_order
from jetgraph.taylor.interpreter import JetInterpreter, run_series
from jetgraph.taylor.rules import RULES, has_rule
from jetgraph.taylor.series import Series

__all__ = [
           "MAX_ORDER",
           "RULES",
           "Basis",
           "Jet",
           "JetInterpreter",
           "Series",
           "check_order",
           "has_rule",
           "jet",
           "run_series",
           "trace_callable",
]
