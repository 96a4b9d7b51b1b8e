"""The HTML explorer at SmolLM2 scale, in headless Chromium: file size and load time, and the
docs' screenshots.

Part ``demo``: the demo's own ``report.html`` (``jetgraph demo``: its lens, its explained
prediction and its bigram tables), one screenshot per kind of view into ``docs/img/`` (this script's
stated output; the same driver as ``tests/test_report.py``).

Part ``scale``: the sizes the issue names — a lens of SmolLM2's 30 layers over a 64-token text
(orders 0 and 1, top-10 tokens per cell), an explanation after 2,000 expansions, a bigram table
of 100,000 rows — written as one page, then opened three times: file size, load-and-draw time
(median and range), and the time to redraw the graph at the widest slider setting.

Part ``stress``: a synthetic path attribution with 2,000 graph nodes and 6,000 paths (a SmolLM2
attribution has at most a few hundred nodes: sources, heads and MLPs), to time the graph view at
the size the issue names.

Part ``prompts``: the lens over eight prompts (orders 0 and 1) as per-state curves with their
bands, screenshotted like the demo.

    python -m benchmarks.explorer [--part demo prompts scale]

Writes ``benchmarks/results/explorer.json``; docs/explorer.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications.report import browser, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "explorer.json"
IMAGES = ROOT / "docs" / "img"
TEXT = ("The history of the city begins in the Roman period, when a small settlement grew on the north "
        "bank of the river. In the Middle Ages it became a market town, and by the eighteenth century its "
        "port was one of the busiest in the country. The old bridge, rebuilt after a flood in 1850, still "
        "carries traffic between the two halves of the town, and the cathedral")


def demo_part() -> dict:
    from jetgraph.demo import run_demo

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run_demo("smollm2", "The capital of France is", Path(folder))
        seconds = time.perf_counter() - start
        page = Path(folder) / "report.html"
        shots = browser.screenshots(page, IMAGES)
        renamed = {}
        for name, shot in shots["shots"].items():
            if "-" in name:  # the docs show the first view of each kind
                shot.unlink()
                continue
            target = IMAGES / f"explorer-demo-{name}.png"
            shot.replace(target)
            renamed[name] = str(target.relative_to(ROOT))
        return {"demo_seconds": round(seconds, 1), "bytes": page.stat().st_size,
                "load_seconds": round(shots["seconds"], 3), "problems": shots["problems"],
                "screenshots": renamed}


PROMPTS = ["The capital of France is", "Once upon a time there was a little", "The weather today is",
           "In 1492 Columbus sailed across the", "She opened the door and saw a",
           "Water boils at one hundred", "The best way to learn a language is to", "My favourite food is"]


def prompts_part() -> dict:
    """The lens over eight prompts (order 0 and 1): the per-state curves with their bands."""
    from jetgraph.applications.lens import lens_over_prompts

    model, tokenizer = jetgraph.load_model("smollm2")
    prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p in PROMPTS]
    prog = jetgraph.capture(model, prompts[0].unsqueeze(0), granularity="block")
    averages = lens_over_prompts(prog, prompts, orders=(0, 1), progress=False)
    with tempfile.TemporaryDirectory() as folder:
        page = report(*averages.values(), path=Path(folder) / "lens-prompts.html",
                      title="SmolLM2: the jet lens over 8 prompts")
        shots = browser.screenshots(page, IMAGES)
        renamed = {}
        for name, shot in shots["shots"].items():
            if "-" in name:
                shot.unlink()
                continue
            target = IMAGES / f"explorer-prompts-{name}.png"
            shot.replace(target)
            renamed[name] = str(target.relative_to(ROOT))
        return {"bytes": page.stat().st_size, "load_seconds": round(shots["seconds"], 3),
                "problems": shots["problems"], "screenshots": renamed}


def synthetic_attribution(nodes: int = 2000, paths: int = 6000, seed: int = 0):
    """A stress case, not a model's result: a PathAttribution over ``nodes`` graph nodes (200 source
    positions and heads of 30 layers) with ``paths`` random paths of 1–4 units, contributions
    heavy-tailed; it adds up by construction (the remainder closes it)."""
    from jetgraph.applications.explain import AttributedPath, PathAttribution

    generator = torch.Generator().manual_seed(seed)
    sources = 200
    heads = (nodes - sources - 3) // 30 + 1
    units = [f"attn{layer}.h{head}" for layer in range(30) for head in range(heads)][:nodes - sources - 3]
    listed = []
    for _ in range(paths):
        length = int(torch.randint(1, 5, (1,), generator=generator))
        chosen = sorted(torch.randperm(len(units), generator=generator)[:length].tolist(),
                        key=lambda i: (int(units[i].split(".")[0][4:]), i))
        position = int(torch.randint(0, sources, (1,), generator=generator))
        value = float(torch.randn(1, generator=generator) ** 3)
        listed.append(AttributedPath("embed.token", position, position % 50, tuple(units[i] for i in chosen),
                                     (1,) * length, value))
    listed.sort(key=lambda p: -abs(p.contribution))
    total = sum(p.contribution for p in listed)
    return PathAttribution(tokens=[i % 50 for i in range(sources)], position=sources - 1, target=7,
                           contrast=None, value=total + 1.0, method="synthetic", granularity="head",
                           paths=listed, groups=[], remainder=1.0, expansions=paths, seconds=0.0,
                           stopped="synthetic")


def stress_part(repeats: int = 3) -> dict:
    """The path graph at 2,000 nodes (synthetic): load time and the redraw at 100% and at 10%."""
    why = synthetic_attribution()
    with tempfile.TemporaryDirectory() as folder:
        page = why.to_html(Path(folder) / "stress.html")
        loads, full, tenth = [], [], []
        for _ in range(repeats):
            with browser.opened(page) as (tab, problems, seconds):
                loads.append(seconds)
                for share, times in ((100, full), (10, tenth)):
                    start = time.perf_counter()
                    tab.fill("#attr-share", str(share))
                    tab.dispatch_event("#attr-share", "input")
                    count = tab.locator("#attr-graph g.node").count()
                    times.append(time.perf_counter() - start)
                    if share == 100:
                        nodes_drawn = count
        return {"nodes": nodes_drawn, "paths": len(why.paths), "bytes": page.stat().st_size,
                "load_seconds_median": round(statistics.median(loads), 3),
                "redraw_all_seconds_median": round(statistics.median(full), 3),
                "redraw_tenth_seconds_median": round(statistics.median(tenth), 3), "problems": problems}


def scale_part(repeats: int = 3) -> dict:
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :64]
    prog = jetgraph.capture(model, ids, granularity="block")
    timings = {}
    start = time.perf_counter()
    lenses = jetgraph.lens(prog, ids, orders=(0, 1))
    timings["lens_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    why = jetgraph.explain(prog, ids[:, :16], tokenizer=tokenizer, budget=2000, goal=None)
    timings["explain_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    table = jetgraph.ngrams(prog, "E→U", tokenizer=tokenizer, top=100_000)
    timings["table_seconds"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "scale.html"
        start = time.perf_counter()
        report(why, lenses, table, path=page, tokenizer=tokenizer, input_ids=ids)
        timings["write_seconds"] = time.perf_counter() - start
        loads, redraws, problems = [], [], []
        for _ in range(repeats):
            with browser.opened(page) as (tab, found, seconds):
                loads.append(seconds)
                problems += found
                start = time.perf_counter()
                tab.fill("#attr-share", "100")
                tab.dispatch_event("#attr-share", "input")
                tab.locator("#attr-graph").wait_for()
                redraws.append(time.perf_counter() - start)
                edges = tab.locator("#attr-graph path.edge").count()
        size = page.stat().st_size
    graph = why.to_graph_json()
    return {"seq": int(ids.shape[1]), "states": int(lenses[0].logits.shape[0]), "paths": len(why.paths),
            "graph_nodes": len(graph["nodes"]), "graph_links": len(graph["links"]), "edges_drawn": edges,
            "table_rows": len(table.entries()), "bytes": size,
            "load_seconds_median": round(statistics.median(loads), 3),
            "load_seconds_range": [round(min(loads), 3), round(max(loads), 3)],
            "redraw_seconds_median": round(statistics.median(redraws), 3), "problems": problems,
            **{k: round(v, 1) for k, v in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["demo", "prompts", "scale", "stress"],
                        choices=["demo", "prompts", "scale", "stress"])
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results |= {"machine": platform.platform(), "torch": torch.__version__, "chromium": browser.chromium()}
    parts = {"demo": demo_part, "prompts": prompts_part, "stress": stress_part, "scale": scale_part}
    for name, run in parts.items():
        if name in args.part:
            results[name] = run()
            print(f"{name}:", json.dumps(results[name], indent=1))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
