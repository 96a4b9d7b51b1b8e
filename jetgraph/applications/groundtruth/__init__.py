"""Ground truth for jet read-outs: tiny models trained on data whose bigram statistics are known,
and every bigram read-out scored against that truth.

- :mod:`.corpora`: random sparse Markov chains and BPE-tokenised text with its bigram counts;
- :mod:`.training`: tiny GPT-2s and their training loop (one CPU thread, seeded);
- :mod:`.readouts`: the data-free bigram read-outs of a captured model;
- :mod:`.scores`: top-1, KL and top-k overlap against the truth, and their spread over seeds;
- :mod:`.study`: one trained model scored (a chain or a text run), and runs over seeds.
"""

from jetgraph.applications.groundtruth.corpora import (
    MarkovChain,
    TextCorpus,
    bigram_counts,
    bpe_corpus,
    markov_chain,
    pydoc_text,
)
from jetgraph.applications.groundtruth.readouts import attention_free_paths, bigram_readouts
from jetgraph.applications.groundtruth.scores import BigramTruth, chance_scores, score_readout, spread
from jetgraph.applications.groundtruth.study import ChainSpec, RunResult, over_seeds, run_chain, run_text
from jetgraph.applications.groundtruth.training import TinyConfig, mean_loss, tiny_gpt2, train

__all__ = ["BigramTruth", "ChainSpec", "MarkovChain", "RunResult", "TextCorpus", "TinyConfig",
           "attention_free_paths", "bigram_counts", "bigram_readouts", "bpe_corpus", "chance_scores",
           "markov_chain", "mean_loss", "over_seeds", "pydoc_text", "run_chain", "run_text", "score_readout",
           "spread", "tiny_gpt2", "train"]
