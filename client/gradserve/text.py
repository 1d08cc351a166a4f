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


def token_counts(text: str) -> dict[str, int]:
    """Token count under every (tokenization, preprocess) pair, keyed "char:none", "word:d2l", ..."""
    counts = {}
    for mode in ("none", "d2l"):
        processed = preprocess(text, mode)
        counts[f"char:{mode}"] = len(processed)
        counts[f"word:{mode}"] = len(processed.split())
    return counts
