"""Jet lenses: what each layer's stream already says about the output.

*Iterative lens* (paper §3): for each stream state h_ℓ, the order-k jet of the decoder centred at
h_ℓ and evaluated at h_L, J^k Dec(h_ℓ)(h_L). Order 0 is the logit lens, Dec(h_ℓ). All states
are decoded in one batched call (the codegen's :class:`~jetgraph.codegen.BatchedRun`), and one
Taylor-mode pass at the highest order gives every lower order too: the order-j lens is the sum
of the coefficients 0..j (:func:`iterative_lenses`).

*Joint lens*: the centres are h_0 and the units' contributions γ_ℓ(h_{ℓ−1}) (which sum to h_L),
with per-token softmax weights fitted to the logits (Adam on the logit-space remainder).

*Divergence*: the decoder's Taylor series has a finite radius of convergence, so a lens state far
from h_L (typically h_0, or mid-stack states of a model whose stream norm grows with depth) has
terms that grow geometrically with the order. Such a jet is flagged *divergent*
(:attr:`LensResult.divergent`, the criterion is :func:`divergent_series`) and building the result
warns (:class:`LensSeriesDivergenceWarning`): its metrics are numbers, but they measure a diverging
series, not the decoder. At high order the terms overflow float32 (TinyStories-656K: order 18; see
docs/lens.md); the metrics of a centre and position whose lens logits are not all finite are NaN,
never a number (:class:`LensDivergenceWarning`). The metrics are :mod:`jetgraph.passes.metrics`'.

*Cost*: :func:`lens_plan` prices a lens over prompts (time and peak memory) before any work, and
:func:`lens_over_prompts` picks its batch size so that the planned peak stays under a memory budget.

The package, one job per module: :mod:`.results` (results, tables, divergence), :mod:`.compute`
(the lenses), :mod:`.prompts` (many prompts: plan, batches, averages).
"""

from jetgraph.applications.lens.compute import (
    JOINT_LABEL,
    ahead_lens,
    contribution_centers,
    iterative_lens,
    iterative_lenses,
    joint_lens,
)
from jetgraph.applications.lens.fitted import FITTED_KINDS, Corpus, FittedLens
from jetgraph.applications.lens.jacobian import (
    SKIP_FIRST_POSITIONS,
    fit_jacobian_lens,
    fit_jacobian_lens_reverse,
    jacobian_lens,
)
from jetgraph.applications.lens.prompts import (
    DEFAULT_BATCH_SIZE,
    MEMORY_FRACTION,
    LensSizes,
    lens_batch_size,
    lens_over_prompts,
    lens_plan,
    pad_batch,
)
from jetgraph.applications.lens.results import (
    CSV_COLUMNS,
    DIVERGENCE_REMAINDER,
    LensAverage,
    LensDivergenceWarning,
    LensKind,
    LensResult,
    LensSeriesDivergenceWarning,
    divergent_series,
    lens_rows,
    metric_table,
    write_lens_csv,
)
from jetgraph.applications.lens.tuned import fit_tuned_lens

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_BATCH_SIZE",
    "DIVERGENCE_REMAINDER",
    "FITTED_KINDS",
    "JOINT_LABEL",
    "MEMORY_FRACTION",
    "SKIP_FIRST_POSITIONS",
    "Corpus",
    "FittedLens",
    "LensAverage",
    "LensDivergenceWarning",
    "LensKind",
    "LensResult",
    "LensSeriesDivergenceWarning",
    "LensSizes",
    "ahead_lens",
    "contribution_centers",
    "divergent_series",
    "fit_jacobian_lens",
    "fit_jacobian_lens_reverse",
    "fit_tuned_lens",
    "iterative_lens",
    "iterative_lenses",
    "jacobian_lens",
    "joint_lens",
    "lens_batch_size",
    "lens_over_prompts",
    "lens_plan",
    "lens_rows",
    "metric_table",
    "pad_batch",
    "write_lens_csv",
]
