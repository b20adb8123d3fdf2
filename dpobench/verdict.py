"""Which loss to use: the verdict a sweep's summary supports, in a few lines a reader can check.

The rules, each stated where it is shown:

- a configuration is *degenerate* when its samples fail a health measure the run has: under
  ``HEALTHY_GRAMMATICAL`` of them grammatical (the synthetic task's grammar), or over ``MOST_REPETITIVE`` of them
  repetitive (any text; ``dpobench.degeneration``); degenerate configurations are never picked, whatever their gold
  reward; the others are *healthy*;
- the *Pareto set* is the healthy configurations no other healthy one beats on both gold reward (higher) and KL
  to the reference (lower);
- *most reward*: the healthy configuration with the best rank (the summary's rank, whose ties are differences
  within noise), the highest gold reward among those; the others of that rank are named as ties;
- *least drift*: the healthy configuration with the lowest KL among those that keep ``NEAR_BEST`` of the best
  gain in gold reward over the SFT reference;
- a warning when the ranking rests on one seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["DEGENERATE_RULE", "HEALTHY_GRAMMATICAL", "MOST_REPETITIVE", "NEAR_BEST", "NO_PICK", "Verdict",
           "configuration_name", "decision_table", "degenerate", "verdict"]  # fmt: skip

#: the share of grammatical samples below which a configuration counts as degenerate (the synthetic task's grammar)
HEALTHY_GRAMMATICAL = 0.8
#: the share of repetitive samples above which a configuration counts as degenerate (any text): a policy that loops
#: on one prompt in five has found something its reward likes better than saying something
MOST_REPETITIVE = 0.2
#: the health rule in words, as the verdict, the report and `dpobench compare` say it
DEGENERATE_RULE = f"under {HEALTHY_GRAMMATICAL:.0%} grammatical or over {MOST_REPETITIVE:.0%} repetitive samples"
#: the share of the best gain over the reference that "least drift" must keep
NEAR_BEST = 0.9
#: what is said where a run has a gold reward and no healthy configuration
NO_PICK = f"No pick: every configuration's samples are degenerate ({DEGENERATE_RULE})"


def degenerate(rows: pd.DataFrame) -> pd.Series:
    """True for each row (a configuration, or a cell) whose samples fail a health measure it has: under
    ``HEALTHY_GRAMMATICAL`` grammatical, or over ``MOST_REPETITIVE`` repetitive. A measure a row lacks (NaN: no
    grammar under ``--judge``; a store from before the repetition was measured) does not count against it."""
    flagged = pd.Series(False, index=rows.index)
    if "grammatical_fraction" in rows:
        flagged |= rows.grammatical_fraction < HEALTHY_GRAMMATICAL
    if "repetitive_fraction" in rows:
        flagged |= rows.repetitive_fraction > MOST_REPETITIVE
    return flagged


@dataclass(frozen=True)
class Verdict:
    most_reward: str
    most_reward_ties: tuple[str, ...]
    least_drift: str
    pareto: tuple[str, ...]
    degenerate: tuple[str, ...]
    seeds: int
    lines: tuple[str, ...]
    #: each healthy configuration off the Pareto set → the Pareto configuration with the most reward that beats it
    beaten_by: dict[str, str] = field(default_factory=dict)


def verdict(summary: pd.DataFrame, reference_gold: float, most: int | None = 6) -> Verdict | None:
    """The verdict of a ``tables.summary_table`` ranked by gold reward (its clean scenario, where it has one); None
    where there is nothing to decide on (no gold reward: pairs from ``--data``; no healthy configuration). Its lines
    name ``most`` configurations of a list and count the rest (None: name them all)."""
    if "gold_reward" not in summary or "kl_to_reference" not in summary:
        return None
    rows = summary[(summary.seeds > 0) & summary.gold_reward.notna() & summary.kl_to_reference.notna()]
    if "clean" in set(rows.scenario):
        rows = rows[rows.scenario == "clean"]
    if rows.empty:
        return None
    names = {i: configuration_name(row) for i, row in rows.iterrows()}
    flagged = degenerate(rows)
    healthy = rows[~flagged]
    unhealthy = tuple(names[i] for i in rows.index[flagged])
    if healthy.empty:
        return None
    best_rank = healthy["rank"].min() if "rank" in healthy and healthy["rank"].notna().any() else None
    top = healthy[healthy["rank"] == best_rank] if best_rank is not None else healthy
    winner = top.gold_reward.idxmax()
    ties = tuple(names[i] for i in top.sort_values("gold_reward", ascending=False).index if i != winner)
    gain = healthy.gold_reward - reference_gold
    best_gain = gain.max()
    keeping = healthy[gain >= NEAR_BEST * best_gain] if best_gain > 0 else healthy.loc[[winner]]
    drift = keeping.kl_to_reference.idxmin()
    by_gold = healthy.sort_values("gold_reward", ascending=False)
    beats = {  # i → the healthy rows at least as good on both, and better on one
        i: by_gold[(by_gold.gold_reward >= row.gold_reward) & (by_gold.kl_to_reference <= row.kl_to_reference)
                   & ((by_gold.gold_reward > row.gold_reward) | (by_gold.kl_to_reference < row.kl_to_reference))].index
        for i, row in by_gold.iterrows()
    }  # fmt: skip
    pareto = tuple(names[i] for i in by_gold.index if beats[i].empty)
    beaten_by = {
        names[i]: next(names[j] for j in better if beats[j].empty) for i, better in beats.items() if len(better)
    }
    seeds = int(rows.seeds.min())
    lines = [
        f"Most reward: {names[winner]} ({_scores(rows.loc[winner])})"
        + (f"; tied within noise with {_list(ties, most)}" if ties else ""),
        f"Least drift for ≥ {NEAR_BEST:.0%} of the best gain over the SFT reference: {names[drift]} "
        f"({_scores(rows.loc[drift])})",
        f"Pareto set (gold ↑, KL ↓, among the healthy): {_list(pareto, most)}",
    ]
    if unhealthy:
        lines.append(f"Not picked, degenerate ({DEGENERATE_RULE}): {_list(unhealthy, most)}")
    if seeds == 1:
        lines.append("One seed: the order rests on one training run per configuration; --seeds 0,1,2 measures it")
    betas = rows.beta.dropna().unique() if "beta" in rows else []
    if len(betas) == 1:
        lines.append(f"One β ({betas[0]:g}) for every configuration: --betas 0.05,0.1,0.5 compares β values")
    return Verdict(names[winner], ties, names[drift], pareto, unhealthy, seeds, tuple(lines), beaten_by)


def configuration_name(row: pd.Series) -> str:
    """A summary row's name as the verdict says it: its configuration, and its β where it has one."""
    label = str(row.get("configuration") or row.variant)
    beta = row.get("beta", math.nan)
    return label if beta is None or (isinstance(beta, float) and math.isnan(beta)) else f"{label} β={beta:g}"


def _scores(row: pd.Series) -> str:
    """Gold ± CI and KL, and the health measure that applies: the grammatical share where the task has a grammar,
    else the repetitive share."""
    ci = row.get("gold_reward_ci", math.nan)
    gold = f"gold {row.gold_reward:+.3f}" + (f" ± {ci:.3f}" if isinstance(ci, float) and not math.isnan(ci) else "")
    grammatical, repetitive = row.get("grammatical_fraction", math.nan), row.get("repetitive_fraction", math.nan)
    health = (f", {grammatical:.0%} grammatical" if not pd.isna(grammatical)
              else f", {repetitive:.0%} repetitive" if not pd.isna(repetitive) else "")  # fmt: skip
    return f"{gold}, KL {row.kl_to_reference:.2f}{health}"


def _list(names: tuple[str, ...], most: int | None) -> str:
    if most is None or len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:most]) + f" and {len(names) - most} more"


def decision_table(summary: pd.DataFrame, decided: Verdict | None = None) -> pd.DataFrame:
    """The summary cut to what a choice rests on, best first, as a reader reads it: rank, configuration, β, gold ±
    95% CI, KL, grammatical and repetitive shares and length, formatted; the scenario where there are several. Its
    ``verdict`` column says what the verdict (``decided``) made of each row: "most reward", "least drift", "tie",
    "Pareto set", and "degenerate samples" for each configuration ``degenerate`` flags, so that a degenerate row
    never shares a rank unflagged."""
    rows = summary.reset_index(drop=True)

    def number(column: str, fmt: str) -> list[str] | None:
        return [("–" if pd.isna(v) else format(v, fmt)) for v in rows[column]] if column in rows else None

    ci = rows["gold_reward_ci"] if "gold_reward_ci" in rows else pd.Series(math.nan, index=rows.index)
    gold = [
        ("–" if pd.isna(g) else f"{g:+.3f}" + ("" if pd.isna(c) else f" ± {c:.3f}"))
        for g, c in zip(rows.gold_reward, ci, strict=True)
    ]
    columns = {
        "rank": [("–" if pd.isna(r) else str(int(r))) for r in rows["rank"]] if "rank" in rows else None,
        "configuration": rows.get("configuration", rows.variant).astype(str).tolist(),
        "β": number("beta", "g"),
        "scenario": rows.scenario.tolist() if rows.scenario.nunique() > 1 else None,
        "gold ± 95% CI": gold,
        "KL": number("kl_to_reference", ".2f"),
        "grammatical": number("grammatical_fraction", ".0%"),
        "repetitive": number("repetitive_fraction", ".0%"),
        "length": number("response_length", ".1f"),
    }
    table = pd.DataFrame({k: v for k, v in columns.items() if v is not None})
    flagged = degenerate(rows)
    table["verdict"] = [_what_became_of(configuration_name(row), flagged[i], decided) for i, row in rows.iterrows()]
    return table


def _what_became_of(name: str, is_degenerate: bool, decided: Verdict | None) -> str:
    if is_degenerate:
        return "degenerate samples"
    if decided is None:
        return ""
    said = [("most reward", name == decided.most_reward), ("least drift", name == decided.least_drift),
            ("tie", name in decided.most_reward_ties), ("Pareto set", name in decided.pareto),
            (f"beaten by {decided.beaten_by.get(name)}", name in decided.beaten_by)]  # fmt: skip
    return ", ".join(word for word, holds in said if holds)
