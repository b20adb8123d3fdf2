"""pandas views on the results (the reports issue builds figures and HTML/PDF on these)."""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["T_975", "aggregate", "variant_table"]

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t_quantile(df: int) -> float:
    return T_975[df - 1] if 1 <= df <= len(T_975) else 1.96


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (variant, β, scenario); the gold-reward 95% CI is a t-interval over seeds, or
    1.96 × the sampling standard error when there is one seed."""
    rows = []
    for (variant, beta, scenario), group in summary.groupby(["variant", "beta", "scenario"], dropna=False, sort=False):
        done = group[group.status == "done"]
        row = {"variant": variant, "beta": beta, "scenario": scenario, "seeds": len(group),
               "failed": int((group.status != "done").sum())}  # fmt: skip
        for column in ["loss", "reward_margin", "reward_accuracy", "gold_reward", "kl_to_reference", "response_length",
                       "grammatical_fraction", "heldout_reward_accuracy", "pairs_per_s", "tokens_per_s", "peak_memory_mb"]:  # fmt: skip
            row[column] = done[column].mean() if len(done) else math.nan
        gold = done.gold_reward.dropna()
        if len(gold) > 1:
            row["gold_reward_ci"] = t_quantile(len(gold) - 1) * gold.std(ddof=1) / math.sqrt(len(gold))
        elif len(gold) == 1:
            row["gold_reward_ci"] = 1.96 * float(done.gold_reward_se.iloc[0])
        else:
            row["gold_reward_ci"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def variant_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The terminal summary: one formatted row per variant × β × scenario, the reference first."""
    frame = aggregate(summary)
    frame["order"] = (frame.variant != "(reference)").astype(int)
    frame = frame.sort_values(["order", "scenario", "gold_reward"], ascending=[True, True, False])

    def fmt(value: float, spec: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    table = pd.DataFrame(
        {
            "variant": frame.variant,
            "β": [fmt(b, "g") for b in frame.beta],
            "scenario": frame.scenario,
            "loss": [fmt(v, ".3f") for v in frame.loss],
            "margin": [fmt(v, ".2f") for v in frame.reward_margin],
            "acc": [fmt(v, ".2f") for v in frame.reward_accuracy],
            "gold ± 95% CI": [
                "–" if math.isnan(g) else f"{g:+.3f}±{c:.3f}"
                for g, c in zip(frame.gold_reward, frame.gold_reward_ci, strict=True)
            ],
            "KL": [fmt(v, ".2f") for v in frame.kl_to_reference],
            "len": [fmt(v, ".1f") for v in frame.response_length],
            "gram": [fmt(v, ".2f") for v in frame.grammatical_fraction],
            "pairs/s": [fmt(v, ".0f") for v in frame.pairs_per_s],
            "status": ["failed" if f else "ok" for f in frame.failed],
        }
    )
    if frame.scenario.nunique() <= 1:
        table = table.drop(columns="scenario")
    if not frame.failed.any():
        table = table.drop(columns="status")
    return table.reset_index(drop=True)
