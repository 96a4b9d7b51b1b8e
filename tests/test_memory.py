"""No weight copies: the program and the code emitted from it hold the model's own tensors.

(What capture allocates beside them is measured by benchmarks/bench_capture.py: 7-8% of the
parameters' bytes. The "doubling" of RSS after a first capture of a model loaded from safetensors
is its memory-mapped weights being paged in, as by any forward: file-backed, not a copy.)
"""

from __future__ import annotations

import jetgraph
from jetgraph.capture.zoo import tiny_model
from tests.conftest import random_ids


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_the_program_shares_every_weight_with_the_model() -> None:
    model = tiny_model("llama")
    prog = jetgraph.capture(model)
    own = _storages([*model.parameters(), *model.buffers()])
    held = [t for gm in prog.graph_modules() for t in [*gm.parameters(), *gm.buffers()]]
    assert held and _storages(held) <= own


def test_emitted_code_shares_the_programs_weights() -> None:
    model = tiny_model("gpt2")
    prog = jetgraph.capture(model)
    expansion = jetgraph.expand_paths(prog.at("sublayer"), exclude={"attn"}, max_length=1).expansion()
    module = jetgraph.emit(expansion, random_ids(1, 4))
    weights = [t for name, t in module.named_buffers() if not name.startswith("const")]
    assert weights and _storages(weights) <= _storages(model.parameters())
