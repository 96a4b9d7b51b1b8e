"""Cost of order-k jets of a transformer block's pure update, as multiples of one forward.

Blocks: a GPT-2-config block (d=768, 12 heads, seq 64) and a SmolLM2-size Llama block (d=576,
9 heads / 3 KV heads, MLP 1536, seq 64), random init, batch 1, float32. In the same run:
  jetgraph   : jetgraph.jet(block, c, v, order=k) (Taylor mode, all coefficients 0..k)
  autograd   : nested torch.autograd.functional.jvp(create_graph=True), one chain per order
               j = 1..k, summed (what the paper's code does)
  func.jvp   : nested torch.func.jvp to depth k (the k-th coefficient only)
Both alternatives run on the same decomposed graph (LayerNorm as mean/rsqrt, attention as
matmul/softmax, SiLU rewritten as x·sigmoid(x)), where they are correct. Peak memory is the
peak of live tensor storages created during the call (counted by a TorchDispatchMode; inputs
and weights excluded), as a multiple of the forward's. Prints a table and writes benchmarks/results/jets.json.

    python benchmarks/bench_jets.py [--repeats 5] [--device cpu|cuda]
Targets (issue 3): order 4 <= 8x a forward; >= 8x faster than autograd and >= 20x faster than
func.jvp at order 4; cost no faster than O(k^2); peak memory <= (k+2)x the forward's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

import jetgraph

RESULTS = Path(__file__).resolve().parent / "results" / "jets.json"
ORDERS = (1, 2, 3, 4)


def blocks(device: str) -> dict[str, tuple[object, torch.Tensor]]:
    import transformers

    from jetgraph.capture.zoo import gpt2_small_config

    torch.manual_seed(0)
    configs = {
        "gpt2 block (d=768)": transformers.GPT2LMHeadModel(gpt2_small_config(layers=1, vocab_size=512)),
        "smollm2-size llama block (d=576)": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)),
    }
    out = {}
    for name, model in configs.items():
        model.eval()
        ids = torch.randint(0, 512, (1, 64))
        prog = jetgraph.capture(model, ids, granularity="block").to(device)
        h = prog.stream(ids.to(device))[0]
        out[name] = (prog.blocks[0], h)
    return out


def decompose_silu(module: fx.GraphModule) -> fx.GraphModule:
    """A copy with aten.silu as x·sigmoid(x) (nested func.jvp has no rule for silu_backward)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    aten = torch.ops.aten
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target is aten.silu.default:
            x = env[node.args[0]]
            sigmoid = graph.call_function(aten.sigmoid.default, (x,))
            env[node] = graph.call_function(aten.mul.Tensor, (x, sigmoid))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(module, graph)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad() if getattr(fn, "no_grad", False) else torch.enable_grad():
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class LiveMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops while active (exact, device-agnostic).

    Each op output's storage is counted once while any tensor created in the mode shares it;
    storages that existed before (inputs, weights) are not counted.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.owners: dict[int, list[int]] = {}  # data_ptr -> [live tensor count, nbytes]
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.owners[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.owners[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage().data_ptr()
            if key == 0 or key in self.existing:
                continue
            if key not in self.owners:
                self.owners[key] = [0, tensor.untyped_storage().nbytes()]
                self.live += self.owners[key][1]
                self.peak = max(self.peak, self.live)
            self.owners[key][0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def peak_bytes(fn, existing: list[torch.Tensor]) -> int:
    """Peak bytes of the tensors fn creates (weights and inputs in ``existing`` excluded)."""
    gc.collect()
    with LiveMemory(existing) as mode:
        fn()
        gc.collect()
    return mode.peak


def nested_autograd(f, c, v, k):
    """Σ_{j≤k} D^j f(c)[v^j]/j! with one nested autograd.functional.jvp chain per order."""
    total = f(c)
    for j in range(1, k + 1):
        fns = [f]
        for _ in range(j):
            prev = fns[-1]
            fns.append(lambda x, prev=prev: torch.autograd.functional.jvp(prev, x, v, create_graph=True)[1])
        total = total + fns[j](c) / math.factorial(j)
    return total


def nested_func(f, c, v, k):
    fns = [f]
    for _ in range(k):
        prev = fns[-1]
        fns.append(lambda x, prev=prev: torch.func.jvp(prev, (x,), (v,))[1])
    return fns[k](c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    for name, (block, h) in blocks(args.device).items():
        v = torch.randn_like(h) * 0.1
        side = block.side.for_shape(h.shape[0], h.shape[1], h.device)
        plain = decompose_silu(block.graph_module)
        extra = [side[n] for n in block.side_inputs]

        def f(x, plain=plain, extra=extra):
            return plain(x, *extra)

        forward = timed(torch.no_grad()(lambda block=block, h=h, side=side: block(h, side)), args.repeats)
        existing = [h, v, *side.values(), *block.graph_module.parameters(), *block.graph_module.buffers()]
        forward_peak = peak_bytes(torch.no_grad()(lambda block=block, h=h, side=side: block(h, side)),
                                  existing)
        for k in ORDERS:
            ours = torch.no_grad()(lambda k=k, block=block, h=h, v=v, side=side: jetgraph.jet(
                block, h, v, order=k, increment=True, side=side))
            t_ours = timed(ours, args.repeats)
            slow_repeats = max(1, args.repeats // 2)
            t_autograd = timed(lambda k=k, f=f, h=h, v=v: nested_autograd(f, h, v, k), slow_repeats)
            t_func = timed(lambda k=k, f=f, h=h, v=v: nested_func(f, h, v, k), slow_repeats)
            rows.append({
                "block": name, "order": k, "forward_ms": forward * 1e3,
                "jetgraph_x": t_ours / forward, "autograd_x": t_autograd / forward,
                "func_jvp_x": t_func / forward,
                "speedup_vs_autograd": t_autograd / t_ours, "speedup_vs_func_jvp": t_func / t_ours,
                "peak_memory_x": peak_bytes(ours, existing) / max(forward_peak, 1),
            })
            r = rows[-1]
            print(f"{name:34s} k={k}  forward {r['forward_ms']:6.1f} ms  jetgraph {r['jetgraph_x']:5.2f}x  "
                  f"autograd {r['autograd_x']:6.1f}x  func.jvp {r['func_jvp_x']:6.1f}x  "
                  f"speedup {r['speedup_vs_autograd']:5.1f}x / {r['speedup_vs_func_jvp']:5.1f}x  "
                  f"peak mem {r['peak_memory_x']:4.1f}x (target <= {k + 2})", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, device {args.device}, "
                   f"torch {torch.__version__}",
        "command": f"python benchmarks/bench_jets.py --repeats {args.repeats} --device {args.device}",
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
