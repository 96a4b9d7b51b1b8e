"""Explain a prediction by its paths: an exact, complete path attribution of a target logit
(:func:`explain_program`, :class:`PathAttribution`), searched without enumeration."""

from jetgraph.applications.explain.attribution import AttributedPath, DecompositionError, PathAttribution
from jetgraph.applications.explain.compute import METHODS, check_explain_options, explain_program, token_id
from jetgraph.applications.explain.network import FrozenNetwork

__all__ = ["METHODS", "AttributedPath", "DecompositionError", "FrozenNetwork", "PathAttribution",
           "check_explain_options", "explain_program", "token_id"]
