"""Work refused before it starts: Taylor orders bounded with a reason, exhaustive expansions
refused before they are built."""

from __future__ import annotations

from pathlib import Path

import pytest

import jetgraph
from tests.conftest import captured, random_ids

ROOT = Path(__file__).resolve().parents[1]


def test_orders_are_bounded_with_a_reason() -> None:
    from jetgraph.taylor import MAX_ORDER

    _, prog = captured("llama")
    states = prog.stream(random_ids(1, 4))
    with pytest.raises(ValueError, match=f"above the highest supported order {MAX_ORDER}: .*overflow int64"):
        jetgraph.jet(prog.decoder, states[0], states[-1], order=MAX_ORDER + 2)
    with pytest.raises(ValueError, match="above the highest supported order"):
        jetgraph.expand_paths(prog, order=MAX_ORDER + 1)
    with pytest.raises(ValueError, match="non-negative int"):
        jetgraph.count_paths(prog, order=-1)
    with pytest.raises(ValueError, match="non-negative int"):
        jetgraph.count_paths(prog, order=True)
    assert jetgraph.jet(prog.decoder, states[0], states[-1], order=MAX_ORDER).coefficients.isfinite().all()


def test_exhaustive_expansions_are_refused_before_building() -> None:
    from jetgraph.errors import CostError

    _, prog = captured("llama")
    sub = prog.at("sublayer")  # 4 units: 1·2^4 = 16 terms at order 0
    assert len(jetgraph.expand_stream(sub, max_terms=16)) == 16
    with pytest.raises(CostError, match=r"gives 16 terms, more than max_terms=15"):
        jetgraph.expand_stream(sub, max_terms=15)
    paths = jetgraph.expand_paths(sub)
    assert paths.count() == 16 == sum(1 for _ in paths)
    with pytest.raises(CostError, match="16 paths pass the filters, more than max_terms=10"):
        paths.expansion(max_terms=10)
    assert len(paths.expansion(limit=3, max_terms=10)) == 3
