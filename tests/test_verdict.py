"""The verdict on hand-made summaries: ties, a degenerate winner, the Pareto set, one seed against three."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dpobench.verdict import decision_table, verdict


def summary(rows: list[tuple], seeds: int = 3) -> pd.DataFrame:
    """(configuration, β, rank, gold, KL, grammatical) per row, the clean scenario."""
    frame = pd.DataFrame(rows, columns=["configuration", "beta", "rank", "gold_reward", "kl_to_reference",
                                        "grammatical_fraction"])  # fmt: skip
    return frame.assign(variant=frame.configuration, scenario="clean", seeds=seeds, gold_reward_ci=0.05)


def test_a_degenerate_winner_is_not_picked_and_ties_are_called_ties() -> None:
    decided = verdict(summary([
        ("broken", 0.1, 1, 0.40, 5.0, 0.50),  # the highest gold, from a model that writes mostly broken text
        ("dpo", 0.1, 1, 0.30, 0.70, 0.86),
        ("ipo", 0.1, 1, 0.29, 0.40, 0.90),  # same rank as dpo: within noise
        ("cpo", 0.1, 2, 0.25, 0.30, 0.91),
        ("slic", 0.5, 3, 0.10, 0.35, 0.93),  # beaten by cpo on both: not on the frontier
    ]), reference_gold=0.0)  # fmt: skip
    assert decided is not None
    assert decided.most_reward == "dpo β=0.1" and decided.most_reward_ties == ("ipo β=0.1",)
    assert decided.degenerate == ("broken β=0.1",)
    assert decided.pareto == ("dpo β=0.1", "ipo β=0.1", "cpo β=0.1")
    # 90% of the best gain (0.30 over the reference's 0.0) is 0.27: ipo keeps it with less KL than dpo; cpo does not
    assert decided.least_drift == "ipo β=0.1"
    assert decided.lines[0] == (
        "Most reward: dpo β=0.1 (gold +0.300 ± 0.050, KL 0.70, 86% grammatical); tied within noise with ipo β=0.1"
    )
    assert not any(line.startswith("One seed") for line in decided.lines)  # three seeds
    assert not any(line.startswith("One β") for line in decided.lines)  # 0.1 and 0.5
    assert decided.beaten_by == {"slic β=0.5": "cpo β=0.1"}  # the degenerate one is not "beaten": it is out


def test_one_seed_is_said_and_a_variant_without_beta_has_no_beta_in_its_name() -> None:
    decided = verdict(summary([("dpo", 0.1, 1, 0.3, 0.7, 0.9), ("kto_like", math.nan, 2, 0.2, 0.5, 0.9)], seeds=1),
                      reference_gold=0.1)  # fmt: skip
    assert decided is not None and decided.seeds == 1
    assert decided.lines[-2].startswith("One seed: the order rests on one training run per configuration")
    assert decided.lines[-1] == "One β (0.1) for every configuration: --betas 0.05,0.1,0.5 compares β values"
    assert decided.pareto == ("dpo β=0.1", "kto_like")
    assert decided.least_drift == "dpo β=0.1"  # kto_like's gain 0.1 is half of dpo's 0.2


def test_no_verdict_without_a_gold_reward_or_a_healthy_configuration() -> None:
    assert verdict(summary([("dpo", 0.1, 1, 0.3, 0.7, 0.9)]).drop(columns="gold_reward"), 0.0) is None
    assert verdict(summary([("dpo", 0.1, 1, 0.3, 0.7, 0.5)]), 0.0) is None  # every configuration degenerate


def test_the_decision_table_keeps_what_a_choice_rests_on_and_says_what_became_of_each_row() -> None:
    """Rows as the reader reads them, and the verdict's word on each: the degenerate row shares rank 1 with the pick,
    flagged in the table itself; the tie and the Pareto set named; the scenario column only where there are several."""
    rows = summary([("broken", 0.1, 1, 0.40, 5.0, 0.50), ("dpo", 0.1, 1, 0.30, 0.70, 0.86),
                    ("ipo", 0.1, 1, 0.29, 0.20, 0.90), ("slic", 0.1, 4, 0.10, 0.90, 0.93)]).assign(response_length=15.04)  # fmt: skip
    table = decision_table(rows, verdict(rows, 0.0))
    assert list(table.columns) == [
        "rank",
        "configuration",
        "β",
        "gold ± 95% CI",
        "KL",
        "grammatical",
        "length",
        "verdict",
    ]
    assert table.values.tolist() == [
        ["1", "broken", "0.1", "+0.400 ± 0.050", "5.00", "50%", "15.0", "degenerate samples"],
        ["1", "dpo", "0.1", "+0.300 ± 0.050", "0.70", "86%", "15.0", "most reward, Pareto set"],
        ["1", "ipo", "0.1", "+0.290 ± 0.050", "0.20", "90%", "15.0", "least drift, tie, Pareto set"],
        ["4", "slic", "0.1", "+0.100 ± 0.050", "0.90", "93%", "15.0", "beaten by dpo β=0.1"],
    ]
    both = pd.concat([rows, rows.assign(scenario="noisy")])
    assert decision_table(both).columns[3] == "scenario" and decision_table(both).verdict.tolist()[:2] == [
        "degenerate samples",
        "",
    ]


def test_repetition_and_distinct_bigrams_by_hand() -> None:
    """seq-rep-3 and distinct-2 on texts whose n-grams are counted here by hand."""
    from dpobench.degeneration import distinct_n, is_repetitive, repetition

    # "i loved it . i loved it .": 6 word 3-grams, (i loved it) and (loved it .) twice: 4 unique, 1 − 4/6 = 1/3
    assert repetition("I loved it . i loved it .") == pytest.approx(1 / 3)
    assert is_repetitive("i loved it . i loved it .")
    # two sentences sharing "was great ." once: 8 trigrams, 7 unique, 1/8 < 1/4: not a loop
    assert repetition("the pasta was great . the service was great .") == pytest.approx(1 / 8)
    assert not is_repetitive("the pasta was great . the service was great .")
    assert repetition("great great") == 0.0  # no 3-gram at all
    assert repetition("great great great great") == pytest.approx(0.5)  # (great great great) ×2: 1 unique of 2
    # bigrams: "a b c" → (a b)(b c); "a b d" → (a b)(b d): 3 unique of 4
    assert distinct_n(["a b c", "A B d"], 2) == pytest.approx(0.75)
    assert math.isnan(distinct_n(["word", ""], 2))


def test_repetitive_samples_make_a_configuration_degenerate_where_there_is_no_grammar() -> None:
    """A judge's run (real text) has no grammar: its health measure is the share of repetitive samples. The loop that
    a reward likes is not picked, and the verdict says the share it was judged by."""
    rows = summary([("looping", 0.1, 1, 0.60, 3.0, math.nan), ("dpo", 0.1, 2, 0.30, 0.70, math.nan),
                    ("ipo", 0.1, 2, 0.28, 0.30, math.nan)])  # fmt: skip
    rows["repetitive_fraction"] = [0.45, 0.05, 0.20]  # ipo at the threshold: not over it, healthy
    decided = verdict(rows, reference_gold=0.0)
    assert decided is not None
    assert decided.degenerate == ("looping β=0.1",)
    assert decided.most_reward == "dpo β=0.1" and decided.pareto == ("dpo β=0.1", "ipo β=0.1")
    assert decided.lines[0] == "Most reward: dpo β=0.1 (gold +0.300 ± 0.050, KL 0.70, 5% repetitive); tied within " \
        "noise with ipo β=0.1"  # fmt: skip
    assert decided.lines[3] == (
        "Not picked, degenerate (under 80% grammatical or over 20% repetitive samples): looping β=0.1"
    )
    table = decision_table(rows, decided)
    assert list(table.repetitive) == ["45%", "5%", "20%"] and table.verdict[0] == "degenerate samples"
    assert "grammatical" in table  # the column is there, "–" where no grammar measured it
    assert list(table.grammatical) == ["–", "–", "–"]
    # and on the synthetic task both measures apply: grammatical enough but looping is degenerate too
    both = summary([("dpo", 0.1, 1, 0.3, 0.7, 0.95), ("ipo", 0.1, 1, 0.3, 0.6, 0.95)]).assign(
        repetitive_fraction=[0.0, 0.5]
    )
    assert verdict(both, 0.0).degenerate == ("ipo β=0.1",)
