"""How text becomes tokens, in pure Python.

The server counts a dataset's tokens with these rules when it checks that a job
has enough data, and the worker builds its vocabulary with the same rules, so
the two can never disagree.
"""

from __future__ import annotations

import re

_NON_LETTERS = re.compile(r"[^A-Za-z]+")


def preprocess(text: str, mode: str) -> str:
    """Apply the spec's `preprocess` rule: "none", or "d2l" (lowercase letters and single spaces)."""
    if mode == "d2l":
        return _NON_LETTERS.sub(" ", text).lower()
    if mode == "none":
        return text
    raise ValueError(f"unknown preprocess mode {mode!r}")


def tokenize(text: str, tokenization: str) -> list[str]:
    """Split preprocessed text into "char" or "word" tokens."""
    if tokenization == "char":
        return list(text)
    if tokenization == "word":
        return text.split()
    raise ValueError(f"unknown tokenization {tokenization!r}")


def text_stats(text: str) -> dict[str, int]:
    """Token count and distinct tokens under every (tokenization, preprocess) pair.

    Keyed "tokens:char:none", "vocab:word:d2l", and so on. The vocabulary here
    has no <unk> and ignores min_freq, so it is an upper bound of the model's.
    """
    stats = {}
    for mode in ("none", "d2l"):
        processed = preprocess(text, mode)
        words = processed.split()
        stats[f"tokens:char:{mode}"] = len(processed)
        stats[f"vocab:char:{mode}"] = len(set(processed))
        stats[f"tokens:word:{mode}"] = len(words)
        stats[f"vocab:word:{mode}"] = len(set(words))
    return stats
