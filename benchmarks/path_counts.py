"""Tabulate path and term counts for GPT-2 small, SmolLM2-135M and Llama-7B-sized models.

    python benchmarks/path_counts.py > docs/paths_table.md   (docs/paths.md quotes the output)
"""

from __future__ import annotations

import math

from jetgraph.passes.paths import nested_paths, split_term_counts

MODELS = (("GPT-2 small", 12, 2, False), ("SmolLM2-135M", 30, 1, False), ("Llama-2-7B", 32, 1, False),
          ("Pythia-160M (parallel)", 12, 1, True))


def log10_split(sources: int, layers: int, order: int) -> float:
    """log10 of the split term count, exact while small, then by the log recurrence."""
    n, log_n = sources, math.log10(sources)
    for layer in range(layers):
        if n < 10**250:
            n = n + n * math.comb(n - 1 + order, order)
            log_n = math.log10(n)
        else:  # N + N·C(N−1+k, k) ≈ N^{k+1}/k!
            log_n = (order + 1) * log_n - math.log10(math.factorial(order))
        del layer
    return log_n


def main() -> None:
    print("| model | layers | sources | order-0 paths, block | order-0 paths, sublayer | "
          "split terms k=1 (log10) | split terms k=2 (log10) |")
    print("|---|---|---|---|---|---|---|")
    for name, layers, sources, parallel in MODELS:
        block = sources * 2**layers
        sub = sources * (3**layers if parallel else nested_paths([layers, 2]))
        print(f"| {name} | {layers} | {sources} | {block:.3e} (= {sources}·2^{layers}) | "
              f"{sub:.3e} (= {sources}·{3 if parallel else 4}^{layers}) | "
              f"{log10_split(sources, layers, 1):.4g} | {log10_split(sources, layers, 2):.4g} |")
    exact = split_term_counts(1, 4, 1)
    print(f"\nExact split counts, one source, k = 1, first 4 units: {exact}; k = 2: "
          f"{split_term_counts(1, 4, 2)}")


if __name__ == "__main__":
    main()
