"""The synthetic task: gold reward by hand, the grammar recogniser, the tokenizer."""

from __future__ import annotations

import math
import random

import pytest

from dpobench.task import build_tokenizer, gold_reward, is_grammatical, sample_review, sentence_sentiment


@pytest.mark.parametrize(
    ("sentence", "score"),
    [
        ("the movie was great", 1.0),
        ("the acting is very good", 0.6 * 1.5),
        ("the acting was not very good", 0.6 * 1.5 * -0.7),
        ("the plot was not awful", -1.0 * -0.7),
        ("i really loved the plot", 1.0 * 1.5),
        ("i disliked the music", -0.6),
        ("it is about a robot", 0.0),
        ("it runs for two hours", 0.0),
    ],
)
def test_sentence_sentiment_by_hand(sentence: str, score: float) -> None:
    assert sentence_sentiment(sentence) == pytest.approx(score)


def test_gold_reward_is_tanh_of_half_the_sum() -> None:
    text = "the movie was great . i disliked the music . it is about a dog ."
    assert gold_reward(text) == pytest.approx(math.tanh((1.0 - 0.6 + 0.0) / 2))
    assert gold_reward("it runs for three hours .") == 0.0
    # Outside the grammar the lexicon still scores what it sees (so broken text is not reward-neutral).
    assert gold_reward("great great great") == pytest.approx(math.tanh(3.0 / 2))


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("the movie was great .", True),
        ("i truly hated the ending . it is about a ghost .", True),
        ("the movie was great", False),  # unfinished
        ("the movie great was .", False),
        ("great great great .", False),
        ("", False),
        ("the film is good . " * 7, False),  # more than 6 sentences
    ],
)
def test_grammaticality(text: str, ok: bool) -> None:
    assert is_grammatical(text) is ok


def test_sampled_reviews_are_grammatical_deterministic_and_mixed() -> None:
    a = [sample_review(random.Random(3)) for _ in range(1)]
    b = [sample_review(random.Random(3)) for _ in range(1)]
    assert a == b
    rng = random.Random(0)
    reviews = [sample_review(rng) for _ in range(2000)]
    assert all(is_grammatical(r.prompt) and is_grammatical(r.completion) for r in reviews)
    rewards = [gold_reward(r.completion) for r in reviews]
    assert min(rewards) < -0.5 and max(rewards) > 0.5 and abs(sum(rewards) / len(rewards)) < 0.05


def test_tokenizer_round_trips_every_word() -> None:
    tokenizer = build_tokenizer()
    text = "the script was not slightly charming . i absolutely admired the cast ."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], skip_special_tokens=True) == text
