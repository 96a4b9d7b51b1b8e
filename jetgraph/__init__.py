"""jetgraph: a compiler for jet expansions of residual networks.

``prog = jetgraph.capture(model, input_ids)`` turns a causal LM into a residual program
(encoder, residual units, decoder) that later passes expand into paths.
"""

from jetgraph._version import __version__ as __version__
from jetgraph.api import capture
from jetgraph.capture.loading import load_model
from jetgraph.codegen import emit, emit_source
from jetgraph.errors import CaptureError, JetgraphError, JetRuleError, ModelLoadError
from jetgraph.ir import Decoder, Encoder, ResidualProgram, ResidualUnit, SideInputs
from jetgraph.passes.expand import Expansion, Term, expand, expand_stream, source_terms, stream_term
from jetgraph.passes.paths import count_paths, expand_paths
from jetgraph.taylor import Jet, jet

__all__ = [
    "CaptureError",
    "Decoder",
    "Encoder",
    "Expansion",
    "Jet",
    "JetRuleError",
    "JetgraphError",
    "ModelLoadError",
    "ResidualProgram",
    "ResidualUnit",
    "SideInputs",
    "Term",
    "capture",
    "count_paths",
    "emit",
    "emit_source",
    "expand",
    "expand_paths",
    "expand_stream",
    "jet",
    "load_model",
    "source_terms",
    "stream_term",
]
