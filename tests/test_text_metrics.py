"""Text sample scores: hand-computed values, and the collapse detector on real and degenerate text."""

import random

import pytest

from diffusion.scores.text import (
    collapse,
    distinct_n,
    longest_repeat_share,
    punctuation_share,
    text_scores,
    top_token_share,
    words,
)


def test_words_split_punctuation_off():
    assert words("Hark, hark!\nThe lark's") == ["Hark", ",", "hark", "!", "The", "lark", "'", "s"]


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]  # n-grams never cross texts
    assert distinct_n(texts, 1) == 3 / 6
    assert distinct_n(texts, 2) == 3 / 4  # ab ba ab | ac
    assert distinct_n(texts, 3) == 2 / 2  # aba bab
    assert distinct_n(["Hark, hark!"], 1) == 1.0  # case is kept
    assert distinct_n(["a b"], 3) == 0.0 and distinct_n([], 1) == 0.0


def test_longest_repeat_share_by_hand():
    assert longest_repeat_share("a b c a b d") == 4 / 6  # "a b" twice
    assert longest_repeat_share("a b c d") == 0.0
    assert longest_repeat_share("x x x x") == 1.0  # "x x x" at 0 and 1, overlapping, covers all
    assert longest_repeat_share("a b c a b c a b c z") == 9 / 10  # "a b c a b c" at 0 and 3
    assert longest_repeat_share("") == 0.0


def test_shares_by_hand():
    assert top_token_share(["a a b", "c"]) == 2 / 4
    assert punctuation_share(["ab,", " !\n"]) == 2 / 4
    assert top_token_share([""]) == punctuation_share([""]) == 0.0


def degenerate_sets() -> dict[str, list[str]]:
    rng = random.Random(0)
    return {
        "punctuation": ["".join(rng.choice(",.;:!?'- \n") for _ in range(256)) for _ in range(8)],
        "two words": [" ".join(rng.choice(["from", "no"]) for _ in range(50)) for _ in range(8)],
        "one line": [
            line * 6
            for line in ["To be, or not to be: that is the question.\n", "Now is the winter of our discontent\n"] * 4
        ],
        # What a barely trained embedding-diffusion model wrote: letters scattered among spaces.
        "scattered letters": [
            "".join(rng.choice("eeeotaishrn") + " " * rng.randrange(1, 4) for _ in range(60)) for _ in range(8)
        ],
    }


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("punctuation", "punctuation_share"),
        ("two words", "top_token_share"),
        ("one line", "longest_repeat_share"),
        ("scattered letters", "mean_word_length"),
    ],
)
def test_collapse_flags_degenerate_samples(kind, reason):
    reasons = collapse(text_scores(degenerate_sets()[kind]))
    assert any(r.startswith(reason) for r in reasons), reasons


def test_collapse_flags_blank_and_letter_runs():
    assert collapse(text_scores(["  \n"] * 8))
    assert any(r.startswith("mean_word_length") for r in collapse(text_scores(["e" * 256] * 8)))


@pytest.mark.parametrize("count, length", [(8, 128), (64, 256), (64, 1024)])
def test_real_shakespeare_passes(shakespeare_root, count, length):
    text = (shakespeare_root / "tinyshakespeare" / "input.txt").read_text()
    rng = random.Random(count + length)
    texts = [text[start : start + length] for start in (rng.randrange(len(text) - length) for _ in range(count))]
    scores = text_scores(texts)
    assert collapse(scores) == [], scores
