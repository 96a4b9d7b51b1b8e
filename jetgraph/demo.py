"""``jetgraph demo``: the whole pipeline on one model, writing a folder of results.

capture → residual IR → jet lens (orders 0–2) → bigram tables with keyword masses (the default
read-out, the model's own prediction for each token after a line break, then two single paths for
contrast) → a path graph → emitted code for the bigram paths, each step timed, ending with a short
summary of what was found.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

DEMO_PATHS = ("E→U", "E→MLP_last→U")  # single paths, shown against the default read-out
READOUT_TOKENS = 1024  # the default read-out runs the whole model per row and first token: the 1024
FIRST_TOKENS = 4       # tokens the model predicts most and the probe words, after 4 first tokens
PROBES = (" United", " New", " climate", " according", " ice")


class _Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f} s] {message}"
        print(line, flush=True)
        self.lines.append(line)


@torch.no_grad()
def run_demo(model_name: str, text: str, out: Path, chunk: int = 1024) -> int:
    import jetgraph
    from jetgraph.applications import (
        DEFAULT_READOUT,
        InputConvention,
        common_tokens,
        iterative_lenses,
        keyword_ids,
        load_keywords,
        ngram_table,
        write_lens_csv,
    )
    from jetgraph.applications.ngrams.readout import describe_prefixes
    from jetgraph.applications.plots import plot_lens
    from jetgraph.capture.loading import encode
    from jetgraph.files import atomic_write
    from jetgraph.viz import expansion_graph, program_graph, render

    log = _Log()
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = jetgraph.load_model(model_name)
    ids = encode(model, tokenizer, text)
    log.step(f"loaded {model_name}: {type(model).__name__}, input {text!r} ({ids.shape[1]} tokens)")

    prog = jetgraph.capture(model, ids, granularity="block")  # the lens below: a state per layer
    error = (prog(ids) - model(input_ids=ids, use_cache=False).logits).abs().max().item()
    atomic_write(out / "program.txt", prog.at("sublayer").summary_table() + "\n")
    render(program_graph(prog.at("sublayer")), out / "program.svg")
    log.step(f"captured {len(prog.blocks)} blocks / {len(prog.sublayers)} sublayer units; "
             f"max |logit error| vs the model {error:.2e} -> program.txt, program.svg")

    results = list(iterative_lenses(prog, ids, orders=(0, 1, 2)).values())  # one Taylor pass
    plot_lens(results, out / "lens.png", tokenizer, ids)
    write_lens_csv(results, out / "lens.csv")
    middle = len(results[0].labels) // 2
    state = f"{results[0].labels[middle]} (after {results[0].written_by[middle]})"
    cos = {k: results[k].metrics["cosine"][middle].mean().item() for k in range(3)}
    diverging = {k: int(results[k].divergent[middle].sum()) for k in range(3)}  # positions, of the text's
    shown = {k: f"{cos[k]:.3f}" + (f" (diverging series at {diverging[k]} of {ids.shape[1]} positions)"
                                   if diverging[k] else "") for k in range(3)}
    log.step(f"jet lens, orders 0-2 (one Taylor pass): cosine at {state} = "
             + ", ".join(f"{shown[k]} (order {k})" for k in range(3)) + " -> lens.png, lens.csv")

    keywords = keyword_ids(tokenizer, load_keywords("toxic"))
    found: list[str] = []
    vocab = int(prog.decoder.unembedding.shape[0])
    probe_ids = [ids[0] for ids in (tokenizer(w, add_special_tokens=False)["input_ids"] for w in PROBES)
                 if len(ids) == 1]
    convention = InputConvention.from_tokenizer(tokenizer)
    common = common_tokens(prog, min(READOUT_TOKENS, vocab), convention, tokenizer)
    rows = sorted(set(common) | set(probe_ids))
    table = jetgraph.ngrams(prog, DEFAULT_READOUT, tokenizer=tokenizer, keywords=keywords, top=100,
                            contexts=torch.tensor(rows).view(-1, 1), row_top=1, chunk=chunk,
                            first_tokens=0 if convention.prefix else FIRST_TOKENS)
    path = table.export(out / "bigrams_readout.csv", tokenizer)
    tables = [table]
    probes = _probe_rows(table, tokenizer, rows)
    mass = table.mass()
    found.append(f"default read-out {DEFAULT_READOUT}: {probes}; toxic-word mass {mass['mean']:.2e} "
                 f"[{mass['low']:.2e}, {mass['high']:.2e}]")
    log.step(f"bigram table of the default read-out ({DEFAULT_READOUT}: the model after each token, "
             f"{describe_prefixes(table.first_tokens, tokenizer)}) over {len(rows):,} "
             f"tokens (the {READOUT_TOKENS} the model predicts most and the probe words) -> {path.name}")
    for index, spec in enumerate(DEMO_PATHS):
        table = ngram_table(prog, spec, top=100, keywords=keywords, rank="prob", chunk=chunk)
        path = table.export(out / f"bigrams_{index}.csv", tokenizer)
        tables.append(table)
        top = table.entries(tokenizer)[:5]
        pairs = ", ".join(f"{e['context']!r}→{e['next']!r}" for e in top)
        mass = table.mass()
        found.append(f"path {table.path}: top bigrams {pairs}; toxic-word mass {mass['mean']:.2e} "
                     f"[{mass['low']:.2e}, {mass['high']:.2e}]")
        log.step(f"bigram table of the path {table.path} over {len(table.contexts):,} tokens -> {path.name}")

    view = prog.at("sublayer")
    selected = jetgraph.expand_paths(view, exclude={"attn"}, max_length=2)  # kinds, not names
    render(expansion_graph(selected.expansion(limit=60), ids, max_nodes=40), out / "paths.svg")
    total = jetgraph.count_paths(prog, "sublayer")
    log.step(f"{_count(total)} paths at sublayer granularity; {selected.count()} attention-free paths of "
             f"length <= 2 -> paths.svg (the first {min(60, selected.count())})")

    mlps = [u.name for u in view.units if u.kind == "mlp"]
    chosen = {mlps[0], mlps[-1]}
    bigram_paths = jetgraph.expand_paths(view, include=chosen, max_length=1).expansion()
    module = jetgraph.emit_source(bigram_paths, out / "bigram_paths.py", ids, remainder=False)
    size = module.with_suffix(".safetensors").stat().st_size / 1e6
    names = ", ".join(t.name for t in bigram_paths.terms)
    log.step(f"emitted the bigram paths {names} (unit weights: each output is the path's logits, as in "
             f"the tables) as {module.name} (+ {size:.0f} MB of weights)")

    why = jetgraph.explain(prog, ids, tokenizer=tokenizer, budget=500)
    jetgraph.report(why, results, *tables, path=out / "report.html", title=f"jetgraph demo: {model_name}",
                    tokenizer=tokenizer, input_ids=ids)
    best = why.paths[0]
    log.step(f"explained the prediction {why.label(why.target)!r} (logit {why.value:.2f}): top path "
             f"{best.path} carries {best.contribution / why.value:.0%}; completeness "
             f"{why.completeness:.0%} after {why.expansions} expansions -> report.html (lens, paths, tables)")

    summary = [
        f"jetgraph demo on {model_name} ({type(model).__name__}), input {text!r}",
        f"- capture: {len(prog.sublayers)} residual units, logits reproduced to {error:.1e}",
        f"- lens: cosine to the logits at {state}: "
        + ", ".join(f"order {k} {shown[k]}" for k in range(3)),
        *(f"- {line}" for line in found),
        f"- paths: {_count(total)} in total; {len(bigram_paths)} bigram paths emitted as {module.name}",
        f"- explain: {why.label(why.target)!r} ← {best.path} "
        f"({best.contribution / why.value:.0%} of its logit)",
        f"- outputs in {out}/: program.txt/svg, lens.png, lens.csv, bigrams_readout.csv, bigrams_*.csv, "
        f"paths.svg, {module.name}, report.html (open it in a browser)",
        f"- total {time.perf_counter() - log.start:.0f} s",
    ]
    text_summary = "\n".join(summary)
    atomic_write(out / "summary.txt", text_summary + "\n" + "\n".join(log.lines) + "\n")
    print("\n" + text_summary)
    return 0


def _count(value: int) -> str:
    return f"{value:,}" if value < 10**9 else f"{value:.3e}"


def _probe_rows(table, tokenizer, rows: list[int]) -> str:
    """Each probe word's most likely next token in the default read-out (words that are one
    token among the table's rows), as 'word'→'next' pairs."""
    pairs = []
    for word in PROBES:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] not in rows:
            continue
        row = rows.index(ids[0])
        best = int(table.row_index[row, 0])
        pairs.append(f"{word!r}→{tokenizer.decode([best])!r}")
    return ", ".join(pairs) if pairs else "no probe word is one token here"
