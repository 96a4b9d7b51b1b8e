"""Capture layer: models in, decomposed FX graphs out (plus model loading helpers)."""

from jetgraph.capture.export import CapturedGraph, LogitsWrapper, export_model
from jetgraph.capture.loading import load_model

__all__ = ["CapturedGraph", "LogitsWrapper", "export_model", "load_model"]
