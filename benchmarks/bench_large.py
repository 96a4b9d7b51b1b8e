"""A Llama-2-7B-shaped model on a 24 GB machine: capture, a full-vocabulary table and the lens,
with the weights read lazily from bf16 safetensors.

Writes a random-init model of Llama-2-7B's shape (d 4096, d_ff 11008, 32 layers, 32 heads,
V 32000; 6.7 B parameters, 13.5 GB in bf16, more than this machine holds in float32) as sharded
safetensors to a temporary folder, then measures, in a fresh process (so RSS is the
measurement's own):

* ``jetgraph.load_lazy`` + ``jetgraph.capture``: seconds and peak RSS (target ≤ 60 s, ≤ 2 GB);
* the global top-100 table of E→MLP_last→U over all V tokens: seconds against its matmul floor
  (the table's FLOPs at the bf16 matmul rate measured in the same process on the table's own
  shapes; target ≤ 1.3×) and peak RSS (target ≤ 6 GB);
* the iterative lens, orders 0 and 1, on 16 tokens, the blocks streamed through memory:
  seconds and peak RSS (target ≤ 6 GB).

    python benchmarks/bench_large.py                 # writes 13.5 GB to $TMPDIR, removes it after
    python benchmarks/bench_large.py --folder DIR    # keep (or reuse) the model in DIR

Writes benchmarks/results/large.json; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "large.json"
SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
         "max_position_embeddings": 4096}
TINY = {**SHAPE, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2000}
SHARD_BYTES = 2 * 1024**3


def write_model(folder: Path, shape: dict) -> None:
    """Random bf16 weights of ``shape``, sharded, with config.json and the index file."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, index = {}, 0, index + 1

    for name, shape in tqdm(shapes.items(), desc="writing", unit="tensor"):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if size + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += tensor.numel() * 2
    flush()
    index_file = folder / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def bf16_rate(m: int, k: int, n: int, repeats: int = 3) -> float:
    """FLOP/s of a bf16 [m, k] × [k, n] matmul (the table's shapes)."""
    x, w = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
    x @ w
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def measure(folder: Path, chunk: int) -> dict:
    """The three measurements, in this (fresh) process, on the model in ``folder``."""
    from _memory import PeakRSS

    import jetgraph
    from jetgraph.applications import iterative_lenses, ngram_table

    torch.set_grad_enabled(False)
    shape = {key: value for key, value in json.loads((folder / "config.json").read_text()).items()
             if key in SHAPE}
    result: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                    "torch": torch.__version__, "shape": shape, "dtype": "bfloat16", "chunk": chunk}
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338, 3681, 29889, 450, 7483, 310, 9556, 338, 5115,
                         29889, 450]]) % shape["vocab_size"]  # Llama-2 ids of a sentence (any ids do)
    with PeakRSS() as peak:
        start = time.perf_counter()
        model = jetgraph.load_lazy(folder)
        prog = jetgraph.capture(model, ids[:, :8], granularity="block")
        seconds = time.perf_counter() - start
    store = model.jetgraph_weights
    result["capture"] = {"seconds": round(seconds, 1), "peak_rss_gb": round(peak.peak_gb, 2),
                         "resident_parameters": store.loaded(), "parameters": len(store)}
    print(json.dumps({"capture": result["capture"]}))

    d, d_ff, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    rate_mlp = bf16_rate(chunk, d, d_ff)
    rate_unembed = bf16_rate(chunk, d, vocab)
    floor = vocab * 3 * 2 * d * d_ff / rate_mlp + 2 * vocab * vocab * d / rate_unembed
    path = f"E->{prog.at('sublayer').units[-1].name}->U"
    with PeakRSS() as peak:
        start = time.perf_counter()
        table = ngram_table(prog, path, top=100, chunk=chunk, progress=True, max_seconds=None)
        seconds = time.perf_counter() - start
    first = table.entries()[0]
    result["table"] = {"path": path, "contexts": vocab, "seconds": round(seconds, 1),
                       "floor_s": round(floor, 1), "over_floor": round(seconds / floor, 3),
                       "bf16_gflops": [round(rate_mlp / 1e9, 1), round(rate_unembed / 1e9, 1)],
                       "peak_rss_gb": round(peak.peak_gb, 2),
                       "top1": f"{first['context_ids']} -> {first['next_id']} ({first['logit']})"}
    print(json.dumps({"table": result["table"]}))

    with PeakRSS() as peak:
        start = time.perf_counter()
        lenses = iterative_lenses(prog, ids, orders=(0, 1))
        seconds = time.perf_counter() - start
    result["lens"] = {"tokens": ids.shape[1], "orders": [0, 1], "seconds": round(seconds, 1),
                      "peak_rss_gb": round(peak.peak_gb, 2), "states": lenses[0].logits.shape[0],
                      "finite": bool(all(torch.isfinite(lens.logits).all() for lens in lenses.values()))}
    print(json.dumps({"lens": result["lens"]}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="keep the model here (reused if it is there)")
    parser.add_argument("--chunk", type=int, default=512, help="contexts per table chunk")
    parser.add_argument("--tiny", action="store_true",
                        help="a 4-layer d=256 model instead (a check of the script; results not written)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.chunk)))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="jetgraph-7b-"))
    try:
        if not (folder / "model.safetensors.index.json").is_file():
            start = time.perf_counter()
            write_model(folder, TINY if args.tiny else SHAPE)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
        command = [sys.executable, __file__, "--measure", str(folder), "--chunk", str(args.chunk)]
        done = subprocess.run(command, text=True, stdout=subprocess.PIPE, check=True)
        line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        result["command"] = "python benchmarks/bench_large.py"
        for name in ("capture", "table", "lens"):
            print(name, json.dumps(result[name]))
        if not args.tiny:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {RESULTS}")
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
