"""The synthetic task: a stochastic grammar of short movie reviews with a known gold reward.

A miniature of the DPO paper's controlled-sentiment experiment (IMDb + a sentiment classifier), fully
offline. Prompts are review openings; completions are one to four more sentences; the gold reward
scores the completion's sentiment with a lexicon (intensifiers scale, negation flips and damps) and
lies in [-1, 1]. ``is_grammatical`` recognises exactly the sentences the grammar can produce, so
over-optimised policies that break the language show up as a falling grammatical fraction.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

__all__ = [
    "TASK_VERSION",
    "Review",
    "build_tokenizer",
    "gold_reward",
    "is_grammatical",
    "sample_review",
    "sentence_sentiment",
    "vocabulary",
]

#: bump when the grammar, the lexicon or the reward changes: cached models and data are keyed by it
TASK_VERSION = "reviews-1"

SUBJECTS = ["movie", "film", "plot", "acting", "story", "ending", "music", "script", "cast", "dialogue", "pacing"]
COPULAS = ["was", "is"]
ADJECTIVES = {
    "great": 1.0, "excellent": 1.0, "wonderful": 1.0, "brilliant": 1.0, "good": 0.6, "fun": 0.5, "moving": 0.6,
    "charming": 0.5, "awful": -1.0, "terrible": -1.0, "horrible": -1.0, "bad": -0.6, "boring": -0.7, "dull": -0.6,
    "weak": -0.5, "messy": -0.5,
}  # fmt: skip
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "quite": 1.2, "somewhat": 0.6, "slightly": 0.5}
VERBS = {"loved": 1.0, "enjoyed": 0.7, "liked": 0.5, "admired": 0.6, "hated": -1.0, "disliked": -0.6}
ADVERBS = {"really": 1.5, "truly": 1.5, "absolutely": 1.5}
NEGATION = -0.7  # "not great" is bad, but less bad than "awful"
TOPICS = ["detective", "family", "soldier", "robot", "teacher", "dog", "city", "war", "singer", "ghost"]
COUNTS = ["two", "three"]
DAYS = ["monday", "friday", "sunday", "plane", "train"]

_SUBJ = "|".join(SUBJECTS)
_ADJ = "|".join(ADJECTIVES)
_INT = "|".join(INTENSIFIERS)
_PATTERNS = {
    "judgement": re.compile(rf"^the ({_SUBJ}) ({'|'.join(COPULAS)})( not)?( (?:{_INT}))? ({_ADJ})$"),
    "feeling": re.compile(rf"^i( (?:{'|'.join(ADVERBS)}))? ({'|'.join(VERBS)}) the ({_SUBJ})$"),
    "topic": re.compile(rf"^it is about a ({'|'.join(TOPICS)})$"),
    "length": re.compile(rf"^it runs for ({'|'.join(COUNTS)}) hours$"),
    "when": re.compile(rf"^i watched it on a ({'|'.join(DAYS)})$"),
}


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["the", "not", "i", "it", "is", "about", "a", "runs", "for", "hours", "watched", "on", "."]
    for group in (SUBJECTS, COPULAS, ADJECTIVES, INTENSIFIERS, VERBS, ADVERBS, TOPICS, COUNTS, DAYS):
        words += [w for w in group if w not in words]
    return words


def _sentence(rng: random.Random, polarity: float) -> str:
    """One sentence; ``polarity`` in [-1, 1] biases which sentiment words appear."""
    kind = rng.choices(["judgement", "feeling", "neutral"], weights=[0.45, 0.25, 0.30])[0]
    positive = rng.random() < (1 + polarity) / 2
    if kind == "neutral":
        return rng.choice(
            [
                f"it is about a {rng.choice(TOPICS)}",
                f"it runs for {rng.choice(COUNTS)} hours",
                f"i watched it on a {rng.choice(DAYS)}",
            ]
        )
    if kind == "feeling":
        verbs = [v for v, s in VERBS.items() if (s > 0) == positive]
        adverb = f"{rng.choice(list(ADVERBS))} " if rng.random() < 0.3 else ""
        return f"i {adverb}{rng.choice(verbs)} the {rng.choice(SUBJECTS)}"
    negate = rng.random() < 0.15
    adjectives = [a for a, s in ADJECTIVES.items() if (s > 0) == (positive != negate)]
    intensifier = f"{rng.choice(list(INTENSIFIERS))} " if rng.random() < 0.3 else ""
    return f"the {rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {'not ' if negate else ''}{intensifier}{rng.choice(adjectives)}"


@dataclass(frozen=True)
class Review:
    prompt: str  # the opening sentence, ending with " ."
    completion: str  # one to four more sentences


def sample_review(rng: random.Random) -> Review:
    """A review of mixed sentiment: a per-review bias drawn from U(−1, 1) tilts every sentence."""
    polarity = rng.uniform(-1, 1)
    sentences = [_sentence(rng, polarity) for _ in range(1 + rng.randint(1, 4))]
    return Review(prompt=sentences[0] + " .", completion=" ".join(s + " ." for s in sentences[1:]))


def _sentences(text: str) -> list[str]:
    words = text.replace(".", " . ").split()
    sentences, current = [], []
    for word in words:
        if word == ".":
            sentences.append(" ".join(current))
            current = []
        else:
            current.append(word)
    if current:
        sentences.append(" ".join(current))  # an unfinished sentence
    return sentences


def sentence_sentiment(sentence: str) -> float:
    """Lexicon score of one sentence: adjective or verb value × intensifier, × −0.7 when negated."""
    if m := _PATTERNS["judgement"].match(sentence):
        score = ADJECTIVES[m.group(5)]
        if m.group(4):
            score *= INTENSIFIERS[m.group(4).strip()]
        return score * NEGATION if m.group(3) else score
    if m := _PATTERNS["feeling"].match(sentence):
        return VERBS[m.group(2)] * (ADVERBS[m.group(1).strip()] if m.group(1) else 1.0)
    # Outside the grammar, score what a lexicon would see, so broken text still gets a reward.
    words = sentence.split()
    score = sum(ADJECTIVES.get(w, 0.0) + VERBS.get(w, 0.0) for w in words)
    return score * NEGATION if "not" in words else score


def gold_reward(completion: str) -> float:
    """tanh(Σ sentence scores / 2) over the completion: in [−1, 1], 0 for a neutral review."""
    return math.tanh(sum(sentence_sentiment(s) for s in _sentences(completion)) / 2)


def is_grammatical(completion: str, max_sentences: int = 6) -> bool:
    """True when the completion is 1..max_sentences complete sentences the grammar can produce."""
    text = completion.strip()
    if not text.endswith("."):
        return False
    sentences = _sentences(text)
    return 1 <= len(sentences) <= max_sentences and all(any(p.match(s) for p in _PATTERNS.values()) for s in sentences)


SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A word-level tokenizer over the grammar's vocabulary, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS.values()) + vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )
