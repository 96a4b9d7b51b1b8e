"""Target token sets for component roles and masses: a suffix, a pattern, words or ids.

Each entry of a spec selects tokens by their decoded text:

- ``ing``: tokens that decode to exactly that piece, with or without a leading space
  (``"ing"``, ``" ing"``);
- ``suffix:ing``: every token whose text ends in it (``"ing"``, ``" sing"``, ``"thing"``…);
- ``re:PATTERN``: tokens whose whole text matches the regular expression (leading space kept);
- ``id:123`` or an int: that token id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SPEC_HELP = ('"ing" (that exact piece, with or without a leading space), "suffix:ing", "re:PATTERN" '
             '(full match of the decoded text) or "id:123"')


@dataclass(frozen=True)
class TargetSet:
    """The token ids a spec selects (sorted) and the spec, for tables and file headers."""

    spec: str
    ids: tuple[int, ...]

    def describe(self, tokenizer=None, shown: int = 8) -> str:
        """``suffix:ing (312 tokens: 'ing', ' bring', …)``."""
        names = [repr(token_label(tokenizer, i)) if tokenizer is not None else str(i)
                 for i in self.ids[:shown]]
        more = ", …" if len(self.ids) > shown else ""
        return f"{self.spec} ({len(self.ids)} token{'s' * (len(self.ids) != 1)}: {', '.join(names)}{more})"


def token_label(tokenizer, index: int) -> str:
    """A token's text for tables: its decoded text, or its vocabulary entry when that decodes to
    nothing but white space (SentencePiece's word-start "▁", a lone space)."""
    text = tokenizer.decode([int(index)])
    if text.strip() or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return text
    return str(tokenizer.convert_ids_to_tokens(int(index)))


def token_texts(tokenizer, vocab: int) -> list[str]:
    """Every token's decoded text, in id order."""
    return [tokenizer.decode([i]) for i in range(vocab)]


def target_tokens(specs: str | int | Sequence[str | int], vocab: int, tokenizer=None) -> TargetSet:
    """The tokens ``specs`` select (see the module docstring); raises a one-line ValueError for an
    entry that matches nothing, a bad pattern, an id outside the vocabulary, or text specs
    without a tokenizer."""
    if isinstance(specs, (str, int)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ValueError(f"no targets given: give one or more of {SPEC_HELP}")
    texts: list[str] | None = None
    chosen: set[int] = set()
    for spec in specs:
        if isinstance(spec, int) or (isinstance(spec, str) and spec.startswith("id:")):
            index = _token_id(spec)
            if not 0 <= index < vocab:
                raise ValueError(f"target id {index} is outside the vocabulary of {vocab} tokens")
            chosen.add(index)
            continue
        if tokenizer is None:
            raise ValueError(f"the target {spec!r} is text: it needs the tokenizer (or give ids)")
        texts = texts if texts is not None else token_texts(tokenizer, vocab)
        matches = _matches(spec, texts)
        if not matches:
            raise ValueError(f"the target {spec!r} matches no token of the vocabulary; give {SPEC_HELP}")
        chosen.update(matches)
    label = ", ".join(str(s) for s in specs)
    return TargetSet(label, tuple(sorted(chosen)))


def check_target_specs(specs: Sequence[str | int]) -> None:
    """The checks that need no vocabulary (a pattern compiles, an id is an integer, a suffix is
    not empty), so that a command refuses bad targets before loading its model."""
    for spec in specs:
        if isinstance(spec, int) or spec.startswith("id:"):
            _token_id(spec)
        elif spec.startswith("re:"):
            _matches(spec, [])
        elif spec.startswith("suffix:") and not spec[len("suffix:"):]:
            raise ValueError("suffix: needs text after it, e.g. suffix:ing")
        elif not spec.strip():
            raise ValueError(f"the target {spec!r} is empty")


def _token_id(spec: str | int) -> int:
    if isinstance(spec, int):
        return spec
    try:
        return int(spec[3:])
    except ValueError:
        raise ValueError(f"the target {spec!r} is not id:N with an integer N") from None


def _matches(spec: str, texts: list[str]) -> list[int]:
    if spec.startswith("suffix:"):
        suffix = spec[len("suffix:"):]
        if not suffix:
            raise ValueError("suffix: needs text after it, e.g. suffix:ing")
        return [i for i, t in enumerate(texts) if t.endswith(suffix)]
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as exc:
            raise ValueError(f"the target pattern {spec[3:]!r} is not a regular expression: {exc}") from None
        return [i for i, t in enumerate(texts) if pattern.fullmatch(t)]
    piece = spec.strip()
    if not piece:
        raise ValueError(f"the target {spec!r} is empty")
    return [i for i, t in enumerate(texts) if t == piece or t == " " + piece]
