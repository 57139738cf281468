"""Cheap scores of generated text that flag degenerate samples (repetition, punctuation soup).

Everything works on words: `re.findall(r"\\w+|[^\\w\\s]", text)`, i.e. runs of letters/digits/underscore,
and every other non-space character as a word of its own (so "lord," is "lord" and ","). Case is kept.
No torch: these run on the strings a sample run writes.
"""

import re
from collections import Counter

WORD = re.compile(r"\w+|[^\w\s]")

# Thresholds of collapse(), set with a margin from real tiny-shakespeare: excerpts at seeded random
# offsets, 5 draws each of 8 x 128 chars, 8 x 256, 64 x 128, 64 x 256, 64 x 1024, 256 x 512, 1000 x 256,
# and the whole corpus as 1024-char texts. Worst value over all of them (where):
#   distinct_1 0.052, distinct_2 0.387, distinct_3 0.770 (whole corpus: pooled distinct-n falls as the
#   set grows, 64 x 256 gives 0.30 / 0.80 / 0.94), longest_repeat_share 0.121 (8 x 128),
#   top_token_share 0.100 (8 x 128, the comma), punctuation_share 0.067, mean_word_length 4.34.
# Degenerate sets of 8 samples score far outside: "from no from ..." distinct_2 0.01, top_token_share 0.5;
# one line looped: longest_repeat_share 1.0, distinct_2 0.02-0.08; only punctuation: punctuation_share 1.0;
# one passage in every sample: distinct_2 0.12; "eeee...": mean_word_length 256; blank: distinct_1 0.
MIN_DISTINCT_1 = 0.02
MIN_DISTINCT_2 = 0.15
MIN_DISTINCT_3 = 0.3
MAX_LONGEST_REPEAT_SHARE = 0.5
MAX_TOP_TOKEN_SHARE = 0.25
MAX_PUNCTUATION_SHARE = 0.3
MAX_MEAN_WORD_LENGTH = 10.0
# Real excerpts (8-64 texts of 64-256 characters, 5 seeded draws each) never go below 3.77; the
# undertrained embedding-diffusion samples of bench/text_quality.py ("e  o t to  ee ...") give 1.77.
MIN_MEAN_WORD_LENGTH = 2.5


def words(text: str) -> list[str]:
    return WORD.findall(text)


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over the texts (n-grams don't cross texts); 0 when none."""
    grams = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat_share(text: str) -> float:
    """The share of the text's words covered by the occurrences of its longest repeated word n-gram.

    The longest n such that some n-gram occurs at least twice (occurrences may overlap); among such
    n-grams the one covering the most words; the words inside any of its occurrences / all words.
    Without overlaps that is n * occurrences / words. In [0, 1]: 0 when no word repeats, near 1 when
    the text is one passage looped.
    """
    tokens = words(text)

    def repeated(n: int) -> list[tuple[str, ...]]:
        counts = Counter(ngrams(tokens, n))
        return [gram for gram, count in counts.items() if count >= 2]

    # A repeated n-gram's prefixes repeat too, so the longest repeated length can be bisected.
    low, high = 0, len(tokens) - 1  # low: known to repeat (0 trivially); high: the most that can
    while low < high:
        mid = (low + high + 1) // 2
        if repeated(mid):
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return 0.0
    best = 0
    for gram in repeated(low):
        covered = set()
        for start in range(len(tokens) - low + 1):
            if tuple(tokens[start : start + low]) == gram:
                covered.update(range(start, start + low))
        best = max(best, len(covered))
    return best / len(tokens)


def top_token_share(texts: list[str]) -> float:
    """The most frequent word's share of all words (punctuation marks count as words); 0 when none."""
    counts = Counter(word for text in texts for word in words(text))
    return max(counts.values()) / sum(counts.values()) if counts else 0.0


def punctuation_share(texts: list[str]) -> float:
    """The share of non-space characters that are neither letters, digits nor underscore; 0 when none."""
    chars = [c for text in texts for c in text if not c.isspace()]
    return sum(not (c.isalnum() or c == "_") for c in chars) / len(chars) if chars else 0.0


def mean_word_length(texts: list[str]) -> float:
    """Mean characters per \\w+ word: catches letter runs ("eeeeeeee") that no word-level score sees."""
    lengths = [len(word) for text in texts for word in re.findall(r"\w+", text)]
    return sum(lengths) / len(lengths) if lengths else 0.0


def text_scores(texts: list[str]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "longest_repeat_share": sum(map(longest_repeat_share, texts)) / len(texts) if texts else 0.0,
        "top_token_share": top_token_share(texts),
        "punctuation_share": punctuation_share(texts),
        "mean_word_length": mean_word_length(texts),
    }


def collapse(scores: dict[str, float]) -> list[str]:
    """Why the samples look degenerate, one reason per failed check; empty when they look like text."""
    checks = [
        ("distinct_1", scores["distinct_1"] < MIN_DISTINCT_1, f"< {MIN_DISTINCT_1}: few distinct words"),
        ("distinct_2", scores["distinct_2"] < MIN_DISTINCT_2, f"< {MIN_DISTINCT_2}: word pairs repeat"),
        ("distinct_3", scores["distinct_3"] < MIN_DISTINCT_3, f"< {MIN_DISTINCT_3}: word triples repeat"),
        (
            "longest_repeat_share",
            scores["longest_repeat_share"] > MAX_LONGEST_REPEAT_SHARE,
            f"> {MAX_LONGEST_REPEAT_SHARE}: samples loop one passage",
        ),
        (
            "top_token_share",
            scores["top_token_share"] > MAX_TOP_TOKEN_SHARE,
            f"> {MAX_TOP_TOKEN_SHARE}: one word dominates",
        ),
        (
            "punctuation_share",
            scores["punctuation_share"] > MAX_PUNCTUATION_SHARE,
            f"> {MAX_PUNCTUATION_SHARE}: mostly punctuation",
        ),
        (
            "mean_word_length",
            scores["mean_word_length"] > MAX_MEAN_WORD_LENGTH,
            f"> {MAX_MEAN_WORD_LENGTH}: runs of letters, not words",
        ),
        (
            "mean_word_length",
            scores["mean_word_length"] < MIN_MEAN_WORD_LENGTH,
            f"< {MIN_MEAN_WORD_LENGTH}: scattered letters, not words",
        ),
    ]
    return [f"{name} {scores[name]:.3f} {why}" for name, failed, why in checks if failed]
