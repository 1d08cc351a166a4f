"""How text becomes tokens, in pure Python.

The server counts a dataset's tokens with these rules when it checks that a job
has enough data, and the worker builds its vocabulary with the same rules, so
the two can never disagree.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import re
import sys

_NON_LETTERS = re.compile(r"[^A-Za-z]+")


def preprocess(text: str, mode: str) -> str:
    """Apply the spec's `preprocess` rule: "none", or "d2l" (lowercase letters and single spaces)."""
    if mode == "d2l":
        return _NON_LETTERS.sub(" ", text).lower()
    if mode == "none":
        return text
    raise ValueError(f"unknown preprocess mode {mode!r}")


# The token that ends every line of a word-tokenized text under eos.
EOS = "<eos>"


def text_tokens(text: str, tokenization: str, mode: str, eos: bool = False) -> list[str]:
    """The tokens a job trains on: `text` preprocessed (mode) and tokenized.

    With eos every newline of the text becomes a token: EOS between the words
    of two lines (word), a newline character (char; preprocess "d2l" would
    otherwise turn it into a space). Line by line, so that preprocessing never
    merges across a line end.
    """
    if not eos:
        return tokenize(preprocess(text, mode), tokenization)
    lines = [preprocess(line, mode) for line in text.split("\n")]
    if tokenization == "char":
        return list("\n".join(lines))
    out = tokenize(lines[0], tokenization)
    for line in lines[1:]:
        out.append(EOS)
        out += tokenize(line, tokenization)
    return out


def tokenize(text: str, tokenization: str) -> list[str]:
    """Split preprocessed text into "char" or "word" tokens."""
    if tokenization == "char":
        return list(text)
    if tokenization == "word":
        return text.split()
    raise ValueError(f"unknown tokenization {tokenization!r}")


def stat_key(measure: str, tokenization: str, preprocess: str) -> str:
    """The name of one of text_stats's figures: `measure` is "tokens" (the count) or "vocab" (distinct tokens).

    The job store keeps a dataset's figures under these names, so they are made here only.
    """
    return f"{measure}:{tokenization}:{preprocess}"


def text_stats(text: str) -> dict[str, int]:
    """Token count and distinct tokens under every (tokenization, preprocess) pair.

    Keyed "tokens:char:none", "vocab:word:d2l", and so on. The vocabulary here
    has no <unk> and ignores min_freq, so it is an upper bound of the model's.
    Word vocabularies past EXACT_DISTINCT_WORDS are estimates (see TextStats).
    """
    stats = TextStats()
    stats.add(text)
    return stats.result()


# Distinct words are counted exactly up to this many; past it, estimated (DistinctCounter).
EXACT_DISTINCT_WORDS = 65_536
# The k of the k-minimum-values estimate: relative standard error about 1/sqrt(k - 2), 0.78 %.
SKETCH_K = 16_384
# The estimate is raised by this many standard errors, since it feeds a memory estimate that must not fall short.
SKETCH_INFLATION_SE = 3
# A word longer than this many characters is known by a digest of it, so no piece of state grows with one.
LONG_WORD_CHARS = 64
# add() works through its text in slices of this many characters, which bounds its transient lists.
_SLICE_CHARS = 1 << 18
_UNICODE_SIZE = 0x110000
# Past this many distinct characters, a bitmap of all code points (1.1 MB) holds them instead of a set.
_CHARSET_AS_SET = 4096


def _utf8(word: str | bytes) -> bytes:
    return word if isinstance(word, bytes) else word.encode("utf-8", "surrogatepass")


def _long_word_key(word: str | bytes) -> str | bytes:
    # Words come from split(), so none holds whitespace: a key that starts with a space is never a word.
    key = " " + hashlib.blake2b(_utf8(word), digest_size=16).hexdigest()
    return key.encode() if isinstance(word, bytes) else key


_encode_utf8 = operator.methodcaller("encode", "utf-8", "surrogatepass")
_HASH_BITS = sys.hash_info.width


def _hashes(words: set) -> "map[int]":
    """A deterministic 64-bit hash of each word (all str, or all UTF-8 bytes), mapped in C with no
    Python-level call per word.

    The word's UTF-8 as an integer, hashed as an int (n mod 2**61 - 1: documented, and unsalted), then
    mixed by two rounds of the tuple hash (xxHash's round; unsalted too). Only str and bytes hashes are
    salted per process (PYTHONHASHSEED), so this one gives the same value in every server process of a
    Python build. It is 3-4x cheaper per word than blake2b (whose object set-up dominates for short
    words) and, on sequential, prefixed and exhaustive word sets, gives k-minimum-values estimates as
    close as blake2b's. Not cryptographic: like any unkeyed hash, someone grinding words could skew it.
    """
    utf8 = words if isinstance(next(iter(words), b""), bytes) else map(_encode_utf8, words)
    return map(hash, zip(map(hash, zip(map(int.from_bytes, utf8)))))


class DistinctCounter:
    """How many distinct strings were added, in bounded memory.

    Exact while there are at most `exact_limit` of them (they are kept in a set). Past
    that, a k-minimum-values sketch: the k smallest 64-bit hashes of the
    strings seen (_hashes); with the k-th smallest at fraction U of the hash range, (k - 1) / U
    estimates the count without bias, with a relative standard error of about
    1 / sqrt(k - 2) (0.78 % at k = 16,384). The estimate returned is raised by
    SKETCH_INFLATION_SE standard errors (2.3 %), since it feeds a memory estimate that
    should err on the generous side. The set of strings seen before the switch stays
    as a cache: a string in it is never hashed again (its hash is in the sketch or
    above the threshold, which only falls). Memory: the set (at most `exact_limit`
    strings, each at most LONG_WORD_CHARS long when they come from TextStats) and
    at most 2k hashes (_hashes: deterministic, not Python's salted str hash).
    """

    def __init__(self, exact_limit: int = EXACT_DISTINCT_WORDS, k: int = SKETCH_K):
        if not 2 < k <= exact_limit:
            raise ValueError(f"need 2 < k <= exact_limit, got k={k}, exact_limit={exact_limit}")
        self.exact_limit, self.k = exact_limit, k
        self._seen: set[str] = set()
        self._sketch: set[int] | None = None
        self._threshold: int | None = None

    @property
    def exact(self) -> bool:
        return self._sketch is None

    def update(self, strings: set[str]) -> None:
        """Add a set of strings (deduplicate first: each is hashed once per call)."""
        new = strings - self._seen
        if not new:
            return
        if self._sketch is None:
            if len(self._seen) + len(new) <= self.exact_limit:
                self._seen |= new
                return
            self._sketch = set()
            self._offer(self._seen)
        self._offer(new)

    def _offer(self, strings) -> None:
        hashes = _hashes(strings)
        if self._threshold is not None:
            hashes = filter(self._threshold.__gt__, hashes)
        self._sketch.update(hashes)
        if len(self._sketch) >= 2 * self.k:  # prune now and then, not on every call
            kept = sorted(self._sketch)[: self.k]
            self._sketch, self._threshold = set(kept), kept[-1]

    def count(self) -> int:
        if self._sketch is None:
            return len(self._seen)
        smallest = sorted(self._sketch)[: self.k]
        if len(smallest) < self.k:  # only if 64-bit hashes collided: fewer than k distinct hashes at all
            return max(len(smallest), len(self._seen))
        fraction = (smallest[-1] + 2 ** (_HASH_BITS - 1) + 1) / 2**_HASH_BITS  # hash() is signed
        estimate = (self.k - 1) / fraction * (1 + SKETCH_INFLATION_SE / math.sqrt(self.k - 2))
        return max(math.ceil(estimate), self.exact_limit + 1)


class _WordCounter:
    """Whitespace-separated words of a text (str, or bytes split on ASCII whitespace) fed in pieces cut
    anywhere: counted exactly, distinct ones by a DistinctCounter. A word cut by a piece's end is carried
    into the next piece; a word longer than LONG_WORD_CHARS is carried, and counted, as a digest of its
    UTF-8, so neither the carry nor the counter's set grows with one word."""

    def __init__(self):
        self.tokens = 0
        self.distinct = DistinctCounter()
        self._carry = None  # str or bytes, like the pieces
        self._carry_hash = None

    def feed(self, s: str | bytes, words: list | None = None) -> None:
        """Feed the next piece; `words`, if given, is s.split()."""
        if not s:
            return
        if words is None:
            words = s.split()
        head_open, tail_open = not s[:1].isspace(), not s[-1:].isspace()
        if not words:  # only whitespace: whatever was carried has ended
            self._count(self._take_carry())
            return
        if head_open:  # the first word goes on with the carried one
            self._extend(words[0])
            if len(words) == 1 and tail_open:
                return
            words[0] = self._take_carry()
        else:
            self._count(self._take_carry())
        if tail_open:
            self._extend(words.pop())
        self._count_all(words)

    def finish(self) -> None:
        self._count(self._take_carry())

    def _extend(self, piece: str | bytes) -> None:
        if self._carry_hash is None:
            self._carry = piece if self._carry is None else self._carry + piece
            if len(self._carry) <= LONG_WORD_CHARS:
                return
            piece, self._carry = self._carry, None
            self._carry_is_bytes = isinstance(piece, bytes)
            self._carry_hash = hashlib.blake2b(digest_size=16)
        self._carry_hash.update(_utf8(piece))

    def _take_carry(self):
        if self._carry_hash is not None:
            key = " " + self._carry_hash.hexdigest()
            self._carry_hash = None
            return key.encode() if self._carry_is_bytes else key
        word, self._carry = self._carry, None
        return word

    def _count(self, word) -> None:
        if word:
            self.tokens += 1
            self.distinct.update({word})

    def _count_all(self, words: list) -> None:
        if not words:
            return
        self.tokens += len(words)
        distinct = set(words)
        longs = list(itertools.compress(distinct, map(LONG_WORD_CHARS.__lt__, map(len, distinct))))
        if longs:
            distinct.difference_update(longs)
            distinct.update(map(_long_word_key, longs))
        self.distinct.update(distinct)


# d2l on UTF-8 bytes: ASCII letters lowercased, every other byte a space. Each non-ASCII character
# encodes to bytes >= 0x80, none of them letters, so a run of non-letter characters becomes a run of
# spaces exactly where preprocess(text, "d2l") puts its one space, and the letter runs (the words) match.
_D2L_BYTES = bytes(
    c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 else 32 for c in range(256)
)
_D2L_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz ")


class TextStats:
    """text_stats for a text that arrives in pieces, in memory that does not grow with the text.

        stats = TextStats()
        for piece in pieces:      # str, cut anywhere (an incremental decoder's output, say)
            stats.add(piece)
        stats.result()            # == text_stats("".join(pieces))

    Token counts and character vocabularies are exact, and so are word vocabularies
    up to EXACT_DISTINCT_WORDS distinct words; past that they are estimates, a little
    high (DistinctCounter). d2l's "a run of non-letters becomes one space" holds
    across pieces too. State: two DistinctCounters (a few MB at most), a carried word
    of at most LONG_WORD_CHARS characters per mode, and the characters seen (a 1.1 MB
    bitmap at most).
    """

    def __init__(self):
        self._words = {"none": _WordCounter(), "d2l": _WordCounter()}
        self._chars = {"none": 0, "d2l": 0}
        self._charset: set[str] | bytearray = set()  # characters seen (preprocess "none"); a bitmap once many
        self._d2l_charset: set[int] = set()       # bytes seen in the d2l text: letters and the space
        self._d2l_ends_in_space = False
        self._result: dict[str, int] | None = None

    def add(self, text: str) -> None:
        if self._result is not None:
            raise RuntimeError("TextStats.add after result(): the text has ended")
        if len(text) <= _SLICE_CHARS:
            self._add(text)
            return
        for start in range(0, len(text), _SLICE_CHARS):
            self._add(text[start : start + _SLICE_CHARS])

    def _add(self, piece: str) -> None:
        if not piece:
            return
        self._chars["none"] += len(piece)
        if isinstance(self._charset, set):
            self._charset |= set(piece)
            if len(self._charset) > _CHARSET_AS_SET:
                bitmap = bytearray(_UNICODE_SIZE)
                for c in self._charset:
                    bitmap[ord(c)] = 1
                self._charset = bitmap
        else:
            bitmap = self._charset
            for c in set(piece):
                bitmap[ord(c)] = 1
        self._words["none"].feed(piece)
        d2l = _utf8(piece).translate(_D2L_BYTES)
        words = d2l.split()
        starts, ends = d2l[:1] == b" ", d2l[-1:] == b" "
        # preprocess(piece, "d2l") has one space per run of spaces here, and the runs alternate with words.
        space_runs = len(words) - 1 + starts + ends if words else 1
        # Two pieces whose non-letter runs meet make one run, hence one space.
        merged = self._d2l_ends_in_space and starts
        self._chars["d2l"] += len(d2l) - d2l.count(b" ") + space_runs - merged
        self._d2l_ends_in_space = ends
        for c in _D2L_CHARS - self._d2l_charset:
            if c in d2l:
                self._d2l_charset.add(c)
        self._words["d2l"].feed(d2l, words)

    def result(self) -> dict[str, int]:
        """The stats, keyed as text_stats's; ends the text (add() may not follow)."""
        if self._result is None:
            stats = {}
            for mode in ("none", "d2l"):
                words = self._words[mode]
                words.finish()
                stats[stat_key("tokens", "char", mode)] = self._chars[mode]
                stats[stat_key("vocab", "char", mode)] = (
                    (len(self._charset) if isinstance(self._charset, set) else _UNICODE_SIZE - self._charset.count(0))
                    if mode == "none" else len(self._d2l_charset)
                )
                stats[stat_key("tokens", "word", mode)] = words.tokens
                stats[stat_key("vocab", "word", mode)] = words.distinct.count()
            self._result = stats
        return dict(self._result)
