"""A path attribution in the attribution-graph JSON that circuit-tracer's frontend and Neuronpedia
read (``circuit_tracer/frontend/graph_models.py``: ``metadata``, ``qParams``, ``nodes``,
``links``; node ids as its ``create_graph_files.py`` forms them, schema version 1).

The mapping. circuit-tracer's nodes are transcoder features at (layer, position); jetgraph's are
units (attention heads, MLPs) whose output reaches the explained position:

* each source token is an ``embedding`` node ``E_{token}_{position}``;
* each unit on a listed path is a node of its layer (``feature_type`` "cross layer transcoder",
  the frontend's kind for a computing node; ``feature`` numbers the unit within its layer, heads
  first, then the MLP, and ``feature`` is the Cantor pairing of (layer, that number), as there;
  ``clerp`` names it: ``attn3.h5``), at the explained position;
* the unexpanded groups and the remainder are one error node (``feature`` -1, "mlp
  reconstruction error") in the last layer: what the listed paths leave unexplained;
* the target is the ``logit`` node ``{layers+1}_{token}_{position}``;
* each link's ``weight`` is the signed sum of the contributions of the listed paths that use it,
  so the links into the logit add up to the listed paths plus the error node: the model's value.
"""

from __future__ import annotations

import itertools
import math
import re

from jetgraph.ir import DECODER_NAME

SCHEMA_VERSION = 1
UNIT_FEATURE = "cross layer transcoder"
ERROR_FEATURE = "mlp reconstruction error"


def to_graph_json(result: object, slug: str = "jetgraph-explain", layers: int | None = None) -> dict:
    """``result`` (a :class:`PathAttribution`) as a circuit-tracer graph file (a dict; ``json.dump``
    writes it). ``layers``: the model's layer count (default: the largest unit layer + 1)."""
    units = sorted({u for p in result.paths for u in p.units}, key=_unit_key)
    layer_of = {u: _layer(u) for u in units}
    count = layers if layers is not None else max(layer_of.values(), default=-1) + 1
    position = result.position
    within: dict[int, list[str]] = {}
    for unit in units:
        within.setdefault(layer_of[unit], []).append(unit)
    nodes: dict[str, dict] = {}
    mass = math.fsum(abs(p.contribution) for p in result.paths) or 1.0
    through: dict[str, float] = {}

    def add(node_id: str, js: str, feature: int, layer: str, ctx: int, kind: str, clerp: str, **extra) -> str:
        nodes.setdefault(node_id, {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx,
                                   "feature_type": kind, "token_prob": 0.0, "is_target_logit": False,
                                   "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": clerp,
                                   "influence": None, "activation": None} | extra)
        return node_id

    logit = add(f"{count + 1}_{result.target}_{position}", f"L_{result.target}-{position}", result.target,
                str(count + 1), position, "logit", f'Output "{result.label(result.target)}"',
                is_target_logit=True)
    links: dict[tuple[str, str], float] = {}
    for path in result.paths:
        if path.position is None and not path.units:
            continue  # the decoder's own constant: carried by the error node below
        if path.position is None:  # a unit's constant: the path starts at that unit
            chain = []
        else:
            chain = [add(f"E_{path.token}_{path.position}", f"E_{path.token}-{path.position}", path.position,
                         "E", path.position, "embedding", repr(result.label(path.token)))]
        for unit in path.units:
            layer = layer_of[unit]
            feature = within[layer].index(unit)
            chain.append(add(f"{layer}_{feature}_{position}", f"{layer}_{feature}-0", _cantor(layer, feature),
                             str(layer), position, UNIT_FEATURE, unit))
        chain.append(logit)
        for node in chain:
            through[node] = through.get(node, 0.0) + abs(path.contribution)
        for source, target in itertools.pairwise(chain):
            links[(source, target)] = links.get((source, target), 0.0) + path.contribution
    unexplained = result.value - math.fsum(p.contribution for p in result.paths
                                           if p.position is not None or p.units)
    last = max(count - 1, 0)
    error = add(f"{last}_-1_{position}", f"{last}_-1-{position}", -1, str(last), position, ERROR_FEATURE,
                "unexpanded groups, the decoder's constant and the remainder")
    links[(error, logit)] = unexplained
    through[error] = abs(unexplained)
    for node_id, node in nodes.items():
        if node["feature_type"] != "logit":
            node["influence"] = through.get(node_id, 0.0) / (mass + abs(unexplained))
    tokens = [result.label(t) for t in result.tokens]
    return {
        "metadata": {"slug": slug, "scan": f"jetgraph {result.method} paths ({result.granularity})",
                     "transcoder_list": [], "prompt_tokens": tokens, "prompt": "".join(tokens),
                     "node_threshold": None, "schema_version": SCHEMA_VERSION,
                     "info": {"generator": {"name": "jetgraph", "url": "docs/explain.md"},
                              "value": result.value, "target": result.target, "contrast": result.contrast,
                              "decoder": DECODER_NAME}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": list(nodes.values()),
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's ``feature`` of a node: the Cantor pairing of (layer, index)."""
    return (x + y) * (x + y + 1) // 2 + y


def _layer(unit: str) -> int:
    match = re.search(r"(\d+)", unit)
    return int(match.group(1)) if match else 0


def _unit_key(unit: str) -> tuple[int, int, int]:
    """Within a layer: heads by number, then the bias, then the MLP."""
    head = re.search(r"\.h(\d+)$", unit)
    rank = 0 if head else (1 if unit.endswith(".bias") else 2)
    return _layer(unit), rank, int(head.group(1)) if head else 0


__all__ = ["SCHEMA_VERSION", "to_graph_json"]
