"""gradserve.text's streaming stats agree with the stats of the whole text, wherever the text is cut."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from gradserve import text


def whole_text_stats(t: str) -> dict[str, int]:
    """The definition: what text_stats computed, all at once, before it streamed."""
    stats = {}
    for mode in ("none", "d2l"):
        processed = text.preprocess(t, mode)
        words = processed.split()
        stats[f"tokens:char:{mode}"] = len(processed)
        stats[f"vocab:char:{mode}"] = len(set(processed))
        stats[f"tokens:word:{mode}"] = len(words)
        stats[f"vocab:word:{mode}"] = len(set(words))
    return stats


def streamed(t: str, cuts: list[int]) -> dict[str, int]:
    stats, start = text.TextStats(), 0
    for cut in cuts:
        stats.add(t[start:cut])
        start = cut
    stats.add(t[start:])
    return stats.result()


LONG = text.LONG_WORD_CHARS
TRICKY = [
    "",
    " ",
    "The Time, the time!",
    "  leading and trailing  ",
    "non-letters... 42 -- become\tone\n\nspace",
    "caf\u00e9 na\u00efve \u00e9t\u00e9",  # non-ASCII letters are non-letters to d2l
    "a\u3000b\xa0c\x1cd\u2028e",  # Unicode whitespace splits words too
    "emoji\U0001F600joined \U0001F600",
    "lone\ud800surrogate",
    "x" * LONG + " " + "x" * LONG,  # as long as a word may be before it is digested
    "y" * (LONG + 1) + " " + "y" * (LONG + 1) + " " + "y" * LONG,  # one over: counted by digest, still equal
    "z" * (3 * LONG) + "!" + "Z" * (2 * LONG + 5) + " tail",
    "AbC" * 50 + "123" + "abc" * 50,
]


@pytest.mark.parametrize("t", TRICKY)
def test_every_single_cut_gives_the_stats_of_the_whole_text(t):
    expected = whole_text_stats(t)
    assert text.text_stats(t) == expected
    for cut in range(len(t) + 1):
        assert streamed(t, [cut]) == expected, f"cut at {cut}"


def test_random_texts_cut_in_random_places():
    rng = random.Random(7)
    alphabet = list("aAbBzZ  ,.!\n\t1-") + ["\u00e9", "\u3000", "\xa0", "\x1c", "\U0001F600"]
    for _ in range(200):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        if rng.random() < 0.3:
            t += "w" * rng.randrange(LONG - 5, 2 * LONG) + rng.choice(["", " ", "."]) + "v" * rng.randrange(90)
        expected = whole_text_stats(t)
        for _ in range(6):
            cuts = sorted(rng.randrange(len(t) + 1) for _ in range(rng.randrange(1, 8)))
            assert streamed(t, cuts) == expected, (t, cuts)


def test_more_distinct_characters_than_a_set_holds_still_match():
    t = "".join(map(chr, range(0x3000, 0x3000 + 5000))) + " x " + "".join(map(chr, range(0x2F00, 0x3100)))
    expected = whole_text_stats(t)
    assert expected["vocab:char:none"] > text._CHARSET_AS_SET
    assert text.text_stats(t) == expected
    assert streamed(t, [10, 4000, 4097, 5003, 5500]) == expected


def test_a_text_bigger_than_a_slice_matches_too():
    rng = random.Random(3)
    words = ["".join(rng.choices("abcdefgXYZ", k=rng.randint(1, 8))) for _ in range(2000)]
    t = " ".join(rng.choices(words, k=120_000)) + ", the end."
    assert len(t) > 2 * text._SLICE_CHARS
    assert streamed(t, [1, 12345, 300_001]) == whole_text_stats(t)


def test_distinct_words_are_exact_up_to_the_limit_then_estimated_a_little_high():
    limit = text.EXACT_DISTINCT_WORDS
    exact = text.TextStats()
    exact.add(" ".join(f"w{i}" for i in range(limit)) + " w0 w1")
    assert exact.result()["vocab:word:none"] == limit
    for n in (limit + 1, 150_000, 400_000):
        stats = text.TextStats()
        for start in range(0, n, 50_000):  # the same words again cost nothing and change nothing
            stats.add(" ".join(f"word{i}" for i in range(start, min(n, start + 50_000))) + " word1 word2 ")
        got = stats.result()["vocab:word:none"]
        # Relative standard error about 1/sqrt(k) (0.78 %), inflated by 3 of them: high, never low, by a few %.
        assert n < got <= 1.05 * n, (n, got)


def test_the_estimate_is_the_same_in_every_process():
    # Python salts str hashes per process; the sketch's hash must not depend on that.
    code = ("from gradserve import text; c = text.DistinctCounter(exact_limit=1000, k=100); "
            "c.update({f'{i:x}q' for i in range(5000)}); print(c.count())")
    counts = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(counts) == 1 and int(counts.pop()) > 5000
