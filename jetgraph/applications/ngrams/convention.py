"""How a read-out builds its contexts: the tokens the tokenizer puts before any text.

A model sees text the way its tokenizer builds it. A tokenizer that adds a start token (BOS)
trains a model that is off-distribution without it: a Gemma-3-like model read on ``w`` alone
ranks 3 of 40 unambiguous collocations first, on ``BOS w`` 33 of 40. Every read-out of the
model's own stream (the default bigram read-out, its mixtures, the unigram read-out, tables,
roles and the sketch) therefore puts :attr:`InputConvention.prefix` before each context.

The convention comes from the tokenizer (:meth:`InputConvention.from_tokenizer`: the tokens it
adds before a text) or is given explicitly for a model without one (``InputConvention((bos,))``,
or ``InputConvention()`` for a model trained on text that starts with its first token). A read-out
that needs one and is given neither is refused: guessing would give wrong numbers silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROBE_TEXT = "Hello world"


@dataclass(frozen=True)
class InputConvention:
    """``prefix``: the token ids put before every context (empty: none); ``origin``: where it
    came from ("tokenizer" or "given"), for tables and file headers."""

    prefix: tuple[int, ...] = ()
    origin: str = "given"

    def __post_init__(self) -> None:
        prefix = tuple(self.prefix)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefix):
            raise ValueError(f"an input convention's prefix is a sequence of token ids >= 0, "
                             f"got {self.prefix!r}")
        object.__setattr__(self, "prefix", prefix)

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> InputConvention:
        """The tokens ``tokenizer`` puts before a text (its BOS, when it adds one): the ids of a
        probe text with special tokens, up to where the ids without them begin."""
        try:
            plain = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
            special = list(tokenizer(PROBE_TEXT)["input_ids"])  # type: ignore[operator]
        except (TypeError, KeyError) as exc:
            raise TypeError(f"expected a Hugging Face tokenizer (callable, giving input_ids), got "
                            f"{type(tokenizer).__name__}: {exc}") from None
        for start in range(len(special) - len(plain) + 1):
            if special[start:start + len(plain)] == plain:
                return cls(tuple(int(t) for t in special[:start]), "tokenizer")
        raise ValueError(f"cannot tell which tokens the tokenizer adds before a text ({special} with "
                         f"special tokens, {plain} without): give convention=InputConvention(prefix) "
                         "explicitly")

    def validate(self, vocab: int) -> InputConvention:
        if any(t >= vocab for t in self.prefix):
            raise ValueError(f"the input convention's prefix {list(self.prefix)} has ids outside the "
                             f"model's vocabulary of {vocab}: is the tokenizer the model's own?")
        return self

    def describe(self, tokenizer: object = None) -> str:
        """The convention in words: ``BOS '<s>' (id 1), from the tokenizer``."""
        if not self.prefix:
            return f"no prefix ({'the tokenizer adds none' if self.origin == 'tokenizer' else 'given'})"
        shown = ", ".join(f"{_decode(tokenizer, t)!r} (id {t})" if tokenizer is not None else f"id {t}"
                          for t in self.prefix)
        return f"prefix {shown}, {'from the tokenizer' if self.origin == 'tokenizer' else 'given'}"


def input_convention(convention: InputConvention | Sequence[int] | None, tokenizer: object = None,
                     vocab: int | None = None) -> InputConvention:
    """The convention to read with: ``convention`` as given (a sequence of ids is a prefix), else
    the tokenizer's; neither is refused with what to pass."""
    if isinstance(convention, InputConvention):
        resolved = convention
    elif convention is not None:
        if isinstance(convention, (str, bytes)):
            raise TypeError("convention is an InputConvention or a sequence of token ids, not a string")
        resolved = InputConvention(tuple(int(t) for t in convention))
    elif tokenizer is not None:
        resolved = InputConvention.from_tokenizer(tokenizer)
    else:
        raise ValueError("a read-out of the model's own stream builds its contexts the way the tokenizer "
                         "builds text: pass tokenizer=, or convention=InputConvention((bos_id,)) for a model "
                         "trained with a start token (InputConvention() for one trained without)")
    return resolved if vocab is None else resolved.validate(vocab)


def _decode(tokenizer: object, token: int) -> str:
    return tokenizer.decode([token])  # type: ignore[attr-defined]
