"""One rank of a distributed n-gram table, started by tests/test_shard.py as a subprocess.

``python tests/shard_worker.py SPEC.json``. The spec names the tiny model family, the path, the
``ngram_table`` options, the checkpoint file and where rank 0 writes the table's tensors; it may
make one rank die (SIGKILL) or raise after a number of chunks, to test failures. The launcher
sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun would.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

import jetgraph
import jetgraph.applications.ngrams.sweep as sweep
from jetgraph.applications import ngram_table
from jetgraph.capture.zoo import VOCAB, tiny_model


def program(family: str) -> jetgraph.ResidualProgram:
    """The same model and capture as tests/conftest.py's ``captured(family)``."""
    model = tiny_model(family)
    example = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    return jetgraph.capture(model, example)


def table_tensors(table) -> dict[str, torch.Tensor | None]:
    names = ("top_values", "top_logits", "top_index", "row_values", "row_index", "row_max", "log_sum",
             "keyword_logits", "last_values", "last_logits", "last_index")
    return {name: getattr(table, name) for name in names}


def main(spec_file: str) -> int:
    with open(spec_file, encoding="utf-8") as handle:
        spec = json.load(handle)
    rank = int(os.environ.get("RANK", "0"))
    prog = program(spec["family"])
    stop = spec.get("stop")  # {"rank": r, "after": n, "how": "kill" | "raise"}
    if stop and stop["rank"] == rank:
        original, calls = sweep.evaluate_chunk, {"n": 0}

        def stopping(evaluator, ids):
            calls["n"] += 1
            if calls["n"] > stop["after"]:
                if stop["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure for the test")
            return original(evaluator, ids)

        sweep.evaluate_chunk = stopping
    table = ngram_table(prog, spec["path"], progress=False, resume=spec.get("resume"), **spec["options"])
    if rank == 0 and spec.get("out"):
        torch.save(table_tensors(table), spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
