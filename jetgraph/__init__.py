"""jetgraph: a compiler for jet expansions of residual networks.

One obvious name per job::

    prog = jetgraph.capture(model)                  # model -> residual program (IR)
    lens = jetgraph.lens(model, ids, orders=(0, 1, 2))  # the iterative jet lens, all orders
    table = jetgraph.ngrams(prog, "E→MLP_last→U")   # an n-gram table read from a path
    why = jetgraph.explain(prog, ids, " Paris", tokenizer=tok)  # which paths give the logit
    look = jetgraph.explain_attention(prog, ids, "attn1.h3", key=4)  # why a head attends there
    paths = jetgraph.expand_paths(prog, exclude={"attn"}, max_length=1)
    jetgraph.emit_source(paths.expansion(), "bigrams.py")  # expanded model as code

The pipeline, layer by layer: :mod:`jetgraph.capture` (the frontend) builds the
:mod:`jetgraph.ir`; :mod:`jetgraph.taylor` computes jets; :mod:`jetgraph.passes` rewrites units
into expansions and enumerates paths; :mod:`jetgraph.codegen` turns expansions into batched
torch code; :mod:`jetgraph.applications` reads out lenses and n-grams.
"""

from jetgraph._version import __version__ as __version__
from jetgraph.applications import lenses
from jetgraph.applications.entry_points import explain, explain_attention, lens, ngrams
from jetgraph.applications.explain import PathAttribution
from jetgraph.applications.lens import FittedLens
from jetgraph.applications.ngrams import FirstTokens, NgramQuery, PathReader, RunOptions
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.report import report
from jetgraph.applications.saving import load_result, save_result
from jetgraph.capture import load_lazy, load_model
from jetgraph.codegen import emit, emit_source
from jetgraph.errors import CaptureError, CostError, JetgraphError, JetRuleError, ModelLoadError
from jetgraph.ir import Decoder, Encoder, ResidualProgram, ResidualUnit
from jetgraph.passes import (
    Expansion,
    Term,
    count_paths,
    expand,
    expand_paths,
    expand_stream,
    parse_path,
    path_term,
    source_terms,
    stream_term,
)
from jetgraph.taylor import Jet, jet

__all__ = [
    "CaptureError",
    "CostError",
    "Decoder",
    "Encoder",
    "Expansion",
    "FirstTokens",
    "FittedLens",
    "InputConvention",
    "Jet",
    "JetRuleError",
    "JetgraphError",
    "ModelLoadError",
    "NgramQuery",
    "PathAttribution",
    "PathReader",
    "ResidualProgram",
    "ResidualUnit",
    "RunOptions",
    "Term",
    "capture",
    "count_paths",
    "emit",
    "emit_source",
    "expand",
    "expand_paths",
    "expand_stream",
    "explain",
    "explain_attention",
    "jet",
    "lens",
    "lenses",
    "load_lazy",
    "load_model",
    "load_result",
    "ngrams",
    "parse_path",
    "path_term",
    "report",
    "save_result",
    "source_terms",
    "stream_term",
]
