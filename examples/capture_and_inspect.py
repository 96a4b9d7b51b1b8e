"""Capture a model, look at its residual IR, and check the residual identity unit by unit.

    python examples/capture_and_inspect.py                 # a plain torch residual MLP
    python examples/capture_and_inspect.py ../shared/models/tinystories-656k
"""

from __future__ import annotations

import sys

import networkx as nx
import torch

import jetgraph
from jetgraph.capture.zoo import ResidualMLP


def main() -> None:
    if len(sys.argv) > 1:
        model, tokenizer = jetgraph.load_model(sys.argv[1])
        ids = tokenizer("Once upon a time there was a", return_tensors="pt").input_ids
    else:
        torch.manual_seed(0)
        model, ids = ResidualMLP(), torch.randint(0, 128, (1, 6))
    prog = jetgraph.capture(model, ids)
    prog.summary()
    sub = prog.at("sublayer")
    print(f"\n{len(sub.units)} sublayer units: {', '.join(u.name for u in sub.units)}")
    with torch.no_grad():
        states = sub.stream(ids)
        for unit in sub.units:
            gap = (unit(states[unit.reads]) - (states[unit.index + 1] - states[unit.index])).abs().max()
            print(f"  {unit.name:8s} {unit.kind:4s} {unit.module_path:30s} |γ(h) - Δh| = {gap:.2e}")
    graph = sub.to_networkx()
    paths = sum(1 for _ in nx.all_simple_paths(graph, "embed", "unembed"))
    print(f"\nunrolled unit graph: {graph.number_of_nodes()} nodes, {paths} embed→unembed paths")
    print("first unit's pure update as FX code:\n" + sub.units[0].update.code)


if __name__ == "__main__":
    main()
