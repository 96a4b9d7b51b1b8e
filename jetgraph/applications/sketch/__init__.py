"""A jet n-gram language model: an interpolated n-gram LM built only from read-outs of a model.

The paper calls reading n-gram tables off the weights "sketching" the model; this makes it
quantitative. Three data-free tables are read from a captured model:

- **bigram**: the default read-out (:mod:`jetgraph.applications.ngrams.readout`), the model's own
  next-token distribution after each token, averaged over the first tokens it expects; each row
  kept sparse, as its top ``bigram_top`` tokens (:class:`SparseRows`), the rest of its mass
  backing off to the unigram;
- **trigram** (when affordable): the model's prediction for every token pair (a, b), kept as each
  row's top ``top`` tokens; the rest of a row's mass backs off to the bigram;
- **unigram**: the exact bigram rows averaged (what follows a token drawn uniformly), so no
  corpus enters the tables. (The table's stationary distribution, π = π B, scored worse: on
  TinyStories-656K the sketch's perplexity was 608 with it against 598.)

The sparse rows and their back-offs, with q_b the exact read-out row of b, I_b its top K tokens,
u the unigram, t_ab the exact pair row and T_ab its top tokens:

    p₂(c | b)    = q_b(c)                                      if c ∈ I_b
                 = r_b · u(c) / Σ_{j ∉ I_b} u(j),               r_b = 1 − Σ_{j ∈ I_b} q_b(j), otherwise
    p₃(c | a, b) = t_ab(c)                                     if c ∈ T_ab
                 = r_ab · p₂(c | b) / Σ_{j ∉ T_ab} p₂(j | b),   r_ab = 1 − Σ_{j ∈ T_ab} t_ab(j), otherwise

so kept probabilities are exact and every row sums to 1; K = V is the dense table. Memory is
O(V·K) (O(V²·K) with the trigram), and rows are read in chunks.

p(c | a, b) = λ₃ p₃(c | a, b) + λ₂ p₂(c | b) + λ₁ p₁(c), each part normalised, so the mixture is
a distribution. The λ are the only numbers fitted to text: on a development split, never on the
text the perplexities are measured on. :func:`perplexities` compares the sketch with the model
itself, with count-based bigram and unigram LMs trained on the same text, and with the sketch's
parts alone.

The package, one job per module: :mod:`.model` (the LM, saved and loaded), :mod:`.tables`
(reading its tables from a model, planned and checkpointed), :mod:`.text` (windows and sampled
text), :mod:`.evaluation` (baselines and perplexities), :mod:`.report` (the one call).
"""

from jetgraph.applications.sketch.evaluation import CountLM, model_log_probs, perplexities, perplexity
from jetgraph.applications.sketch.model import SketchLM, SparseRows
from jetgraph.applications.sketch.report import SketchReport, sketch_model, text_windows
from jetgraph.applications.sketch.tables import SketchPlan, plan_sketch, read_sketch
from jetgraph.applications.sketch.text import Windows, sample_texts, sampling_rate, split_stream

__all__ = ["CountLM", "SketchLM", "SketchPlan", "SketchReport", "SparseRows", "Windows", "model_log_probs",
           "perplexities", "perplexity", "plan_sketch", "read_sketch", "sample_texts", "sampling_rate",
           "sketch_model", "split_stream", "text_windows"]
