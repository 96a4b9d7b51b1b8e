"""Data whose bigram statistics are known: random sparse Markov chains (exact truth) and real text
with a byte-level BPE (its corpus bigram counts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MarkovChain:
    """A first-order chain over ``vocab`` tokens: ``transition`` [V, V] (rows sum to 1) and its
    ``stationary`` distribution [V], both float64."""

    transition: torch.Tensor
    stationary: torch.Tensor

    @property
    def vocab(self) -> int:
        return int(self.transition.shape[0])

    @property
    def entropy_rate(self) -> float:
        """Nats per token of the stationary chain: the loss a perfect model reaches."""
        logs = self.transition.clamp_min(1e-300).log()
        return float(-(self.stationary[:, None] * self.transition * logs).sum())

    def sample(self, count: int, length: int, seed: int = 0) -> torch.Tensor:
        """``count`` sequences of ``length`` tokens, each started from π (so the chain is stationary)."""
        generator = torch.Generator().manual_seed(seed)
        out = torch.empty(count, length, dtype=torch.long)
        out[:, 0] = torch.multinomial(self.stationary.float(), count, replacement=True, generator=generator)
        rows = self.transition.float()
        for t in range(1, length):
            out[:, t] = torch.multinomial(rows[out[:, t - 1]], 1, generator=generator)[:, 0]
        return out


def markov_chain(vocab: int, successors: int | None = None, alpha: float = 0.2, seed: int = 0) -> MarkovChain:
    """A random chain: each row puts Dirichlet(``alpha``) weights on ``successors`` tokens drawn at
    random (all ``vocab`` tokens when None). Small ``alpha`` and few successors make sharp rows."""
    if vocab < 2:
        raise ValueError(f"a chain needs at least 2 tokens, got vocab={vocab}")
    width = vocab if successors is None else successors
    if not 1 <= width <= vocab:
        raise ValueError(f"successors must be between 1 and vocab={vocab}, got {successors}")
    generator = torch.Generator().manual_seed(seed)
    shape = torch.tensor(alpha, dtype=torch.double)
    gamma = torch.distributions.Gamma(shape, torch.ones_like(shape))
    with torch.random.fork_rng():  # torch.distributions samples from the global generator
        torch.manual_seed(seed)
        weights = gamma.sample((vocab, width)).clamp_min(1e-30)
    columns = torch.stack([torch.randperm(vocab, generator=generator)[:width] for _ in range(vocab)])
    transition = torch.zeros(vocab, vocab, dtype=torch.double).scatter_(1, columns, weights)
    transition = transition / transition.sum(-1, keepdim=True)
    return MarkovChain(transition, stationary_distribution(transition))


def stationary_distribution(transition: torch.Tensor, iterations: int = 100_000) -> torch.Tensor:
    """π with π P = π, by power iteration from the uniform distribution (a lazy step, ½(I + P),
    so periodic chains converge too)."""
    vocab = transition.shape[0]
    lazy = 0.5 * (transition + torch.eye(vocab, dtype=transition.dtype))
    pi = torch.full((vocab,), 1.0 / vocab, dtype=transition.dtype)
    for _ in range(iterations):
        updated = pi @ lazy
        if (updated - pi).abs().max() < 1e-15:
            break
        pi = updated
    return pi / pi.sum()


def bigram_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V, V] float64 counts of (token, next token) over the rows of ``ids`` ([n] or [batch, n])."""
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    flat = (ids[:, :-1] * vocab + ids[:, 1:]).reshape(-1)
    return torch.bincount(flat, minlength=vocab * vocab).view(vocab, vocab).double()


@dataclass
class TextCorpus:
    """A text tokenised by a byte-level BPE trained on it, split into training and held-out ids."""

    train_ids: torch.Tensor
    held_out_ids: torch.Tensor
    tokenizer: object
    source: str

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)  # type: ignore[arg-type]

    def bigram_counts(self) -> torch.Tensor:
        """The training split's [V, V] bigram counts: the text model's ground truth."""
        return bigram_counts(self.train_ids, self.vocab)

    def unigram_counts(self) -> torch.Tensor:
        return torch.bincount(self.train_ids, minlength=self.vocab).double()


def pydoc_text() -> tuple[str, str]:
    """The stdlib's help topics (``pydoc_data.topics``, sorted by name, blank-line separated): ~465k
    characters of real English/Python prose available on every Python, and the file they come from."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)), topics.__file__


def bpe_corpus(text: str, vocab: int, source: str = "text", held_out: float = 0.1,
               max_chars: int | None = None) -> TextCorpus:
    """Train a byte-level BPE of size ``vocab`` on ``text`` and split its ids: the first
    1 − ``held_out`` for training, the rest held out. The tokenizer is a ``transformers`` fast
    tokenizer, so it saves next to a model and loads with ``AutoTokenizer``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = text[:max_chars] if max_chars else text
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab, min_frequency=2, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    ids = torch.tensor(bpe.encode(text).ids, dtype=torch.long)
    split = int((1 - held_out) * ids.numel())
    return TextCorpus(ids[:split], ids[split:], tokenizer, source)
