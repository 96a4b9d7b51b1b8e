"""Keyword lists (shipped or from a file) and their token ids, for keyword probability masses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def keyword_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token ids of a keyword list: every word's first token, with and without a leading space.

    A first token that decodes to nothing but white space (SentencePiece's bare word-start "▁",
    which begins every word) is skipped for the token after it: it says nothing about the word.
    """
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ValueError("the keyword list is empty")
    decode = getattr(tokenizer, "decode", None)
    ids: set[int] = set()
    for word in words:
        for variant in (word, " " + word):
            encoded = [int(i) for i in tokenizer(variant, add_special_tokens=False).input_ids]
            meaningful = [i for i in encoded if decode is None or decode([i]).strip()]
            if meaningful:
                ids.add(meaningful[0])
    return sorted(ids)


def load_keywords(name_or_path: str | Path) -> list[str]:
    """A shipped keyword list (``"refusal"``, ``"toxic"``) or a text file, one entry per line."""
    from importlib import resources

    candidate = Path(name_or_path)
    if candidate.is_file():
        text = candidate.read_text(encoding="utf-8")
    else:
        shipped = resources.files("jetgraph.data").joinpath(f"keywords_{name_or_path}.txt")
        if not shipped.is_file():
            raise ValueError(f"no keyword list {str(name_or_path)!r}: give a file or one of "
                             "'refusal', 'toxic'")
        text = shipped.read_text(encoding="utf-8")
    words = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not words:
        raise ValueError(f"the keyword list {str(name_or_path)!r} is empty")
    return words
