"""How degenerate a policy's samples are, on any text: repetition within a sample, diversity across samples.

The synthetic task's grammar tells a healthy sample from a broken one; real text has no grammar to check, and a
policy pushed too far on it loops ("great great great …") or says one thing to every prompt. Two word-level
measures see that, the same way on every tokenizer (words are the text split at whitespace, lower-cased):

- a sample's *repetition* is seq-rep-n (Welleck et al., 2019, arXiv:1908.04319): the share of its word n-grams
  that repeat an earlier n-gram of the same sample, ``1 − |unique n-grams| / |n-grams|``; a sample is *repetitive*
  when that share is at least ``REPETITIVE_AT`` for n = ``REPEAT_N``;
- *distinct-n* (Li et al., 2016, arXiv:1510.03055): the unique word n-grams of all the samples over all their
  n-grams; samples that say the same things lower it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["REPEAT_N", "REPETITIVE_AT", "distinct_n", "is_repetitive", "repetition"]

#: the n of the word n-grams a repetition is counted in: 3, so that a repeated pair of common words ("of the") is
#: not a loop, and a repeated short sentence ("i loved it . i loved it .") is
REPEAT_N = 3
#: the share of repeated n-grams from which a sample counts as repetitive: a quarter of it says again what it said
REPETITIVE_AT = 0.25


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repetition(text: str, n: int = REPEAT_N) -> float:
    """seq-rep-n of one sample: the share of its word n-grams that repeat an earlier one (0 with no n-gram)."""
    grams = _ngrams(text.lower().split(), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_repetitive(text: str) -> bool:
    """True when at least ``REPETITIVE_AT`` of the sample's word ``REPEAT_N``-grams repeat an earlier one."""
    return repetition(text) >= REPETITIVE_AT


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams over all word n-grams of ``texts`` (each text's own n-grams; NaN with none)."""
    grams = [gram for text in texts for gram in _ngrams(text.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")
