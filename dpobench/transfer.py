"""Does a ranking transfer? Two runs' rankings of the same configurations, side by side, with Kendall's τ and
Spearman's ρ and bootstrap intervals over the held-out prompts (``dpobench compare``).

Each configuration's gold reward is the mean of its per-prompt values (the store keeps each evaluation prompt's), its
seeds averaged prompt by prompt. A bootstrap draw resamples each run's prompts with replacement, independently,
recomputes every configuration's mean in both runs and the two rank correlations: the interval is what the
evaluation's finite prompts leave uncertain. Training's seed-to-seed spread is in it only as far as the runs have
several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dpobench.tables import cell_finals, configuration_labels, is_reference, read_samples, read_tidy
from dpobench.verdict import DEGENERATE_RULE, configuration_name, degenerate

__all__ = ["Transfer", "kendall_tau_b", "rank_transfer", "spearman_rho", "transfers_within"]


@dataclass(frozen=True)
class Transfer:
    """Two runs' rankings: ``table`` (configuration, gold and rank in each, how far it moved, the runs where its
    samples were degenerate), the correlations with their 95% bootstrap intervals, and the number of bootstrap
    draws."""

    table: pd.DataFrame
    tau: float
    tau_interval: tuple[float, float]
    rho: float
    rho_interval: tuple[float, float]
    draws: int

    def summary(self) -> str:
        """What the two rankings share, in words (as ``dpobench compare`` and the report say it): the correlations
        with their intervals, the rule, and the configurations that moved most."""
        interval = lambda pair: f"{pair[0]:.2f} to {pair[1]:.2f}" if self.draws else "no bootstrap"  # noqa: E731
        text = (f"{len(self.table)} configurations in both. Kendall τ-b = {self.tau:.2f} (95% interval "
                f"{interval(self.tau_interval)}); Spearman ρ = {self.rho:.2f} ({interval(self.rho_interval)}); "
                f"intervals from {self.draws} bootstrap draws of each run's held-out prompts. Ranked by gold reward "
                f"alone: 'degenerate in' names the runs where a configuration's samples were degenerate "
                f"({DEGENERATE_RULE}).")  # fmt: skip
        moved = self.table.reindex(self.table.moved.abs().sort_values(ascending=False, kind="stable").index).head(3)
        moved = moved[moved.moved != 0]
        if len(moved):
            text += " Moved most: " + ", ".join(f"{r.configuration} ({r.rank_a} → {r.rank_b})"
                                                for r in moved.itertuples(index=False)) + "."  # fmt: skip
        return text


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b (ties counted as neither concordant nor discordant, and taken out of the denominator)."""
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = np.sqrt(np.abs(sx).sum() * np.abs(sy).sum())
    return float((sx * sy).sum() / denominator) if denominator else float("nan")


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


#: a run's (or a model's) configurations by name: gold reward per evaluation prompt, and whether degenerate
PerPrompt = tuple[dict[str, np.ndarray], dict[str, bool]]


def _per_prompt(finals: pd.DataFrame, samples: pd.DataFrame, source: str, scenario: str) -> PerPrompt:
    """Each configuration of ``finals`` (one run's cells, or one model's) by its name: its gold reward per evaluation
    prompt (``samples``; seeds averaged prompt by prompt), and whether its samples were degenerate
    (``verdict.degenerate`` of its cells' mean health measures). ``source`` names the cells in an error."""
    cells = finals[~is_reference(finals) & (finals.status == "done") & (finals.scenario == scenario)]
    if cells.empty:
        raise ValueError(f"{source}: no finished cells in scenario {scenario!r}")
    cells = cells.assign(configuration=configuration_labels(cells))
    samples = samples[samples.cell_id.isin(cells.cell_id)]
    if samples.empty:
        raise ValueError(f"{source}: its cells kept no per-prompt gold reward (pairs from --data without --judge, or "
                         "a store from before dpobench kept them); compare runs that have a gold reward")  # fmt: skip
    wide = samples.pivot(index="cell_id", columns="prompt", values="gold_reward")
    values: dict[str, np.ndarray] = {}
    unhealthy: dict[str, bool] = {}
    for _, group in cells.groupby(["configuration", "beta"], dropna=False):
        rows = wide.reindex(group.cell_id).dropna(how="all")
        if len(rows):
            name = configuration_name(group.iloc[0])
            values[name] = rows.mean(axis=0).to_numpy(dtype=float)
            health = [m for m in ("grammatical_fraction", "repetitive_fraction") if m in group]
            unhealthy[name] = bool(degenerate(group[health].mean().to_frame().T).iloc[0])
    return values, unhealthy


def _degenerate_in(a: bool, b: bool) -> str:
    return " and ".join(run for run, flagged in (("A", a), ("B", b)) if flagged)


def rank_transfer(store_a: str | Path, store_b: str | Path, scenario: str = "clean", draws: int = 1000,
                  seed: int = 0) -> Transfer:  # fmt: skip
    """The configurations both stores ran (by name and β), ranked by gold reward in each, with Kendall's τ-b and
    Spearman's ρ between the rankings and their 95% bootstrap intervals over each run's held-out prompts."""
    a, b = (_per_prompt(cell_finals(read_tidy(s)), read_samples(s), str(s), scenario) for s in (store_a, store_b))
    return _compare(a, b, f"{store_a} and {store_b}", scenario, draws, seed)


def transfers_within(finals: pd.DataFrame, samples: pd.DataFrame, scenario: str = "clean", draws: int = 1000,
                     seed: int = 0) -> list[tuple[str, str, Transfer]]:  # fmt: skip
    """One store's cells on two or more models (runs with other ``--model`` into one ``--out``): each model's
    ranking against the first model's (the order of ``finals``), as ``rank_transfer`` compares two stores; a model
    sharing fewer than 3 configurations with the first, or without per-prompt gold rewards, is left out.
    ``finals``: ``tables.cell_finals`` of the store, variants under their own names."""
    cells = finals[~is_reference(finals) & (finals.status == "done") & (finals.scenario == scenario)]
    models = list(dict.fromkeys(cells.model))
    if len(models) < 2:
        return []
    per_model = {}
    for model in models:
        try:
            per_model[model] = _per_prompt(cells[cells.model == model], samples, str(model), scenario)
        except ValueError:  # no gold reward per prompt: nothing to rank by
            continue
    usable = [m for m in models if m in per_model]
    found = []
    first = usable[0] if usable else None
    for other in usable[1:]:
        try:
            found.append((first, other, _compare(per_model[first], per_model[other], "", scenario, draws, seed)))
        except ValueError:  # under 3 shared configurations
            continue
    return found


def _compare(run_a: PerPrompt, run_b: PerPrompt, source: str, scenario: str, draws: int, seed: int) -> Transfer:
    """Two rankings (``_per_prompt`` of each) compared; ``source`` names the two in an error."""
    (a, unhealthy_a), (b, unhealthy_b) = run_a, run_b
    names = sorted(set(a) & set(b))
    if len(names) < 3:
        raise ValueError(f"{source} share {len(names)} configuration(s) in {scenario!r}; a rank "
                         "correlation needs 3 or more (the same --variants and --betas in both runs)")  # fmt: skip
    matrix_a, matrix_b = np.stack([a[n] for n in names]), np.stack([b[n] for n in names])
    gold_a, gold_b = matrix_a.mean(axis=1), matrix_b.mean(axis=1)
    table = pd.DataFrame({"configuration": names, "gold_a": gold_a, "gold_b": gold_b})
    table["rank_a"] = table.gold_a.rank(ascending=False, method="min").astype(int)
    table["rank_b"] = table.gold_b.rank(ascending=False, method="min").astype(int)
    table["moved"] = table.rank_b - table.rank_a
    # ranked by gold reward alone, as the runs measured it: a degenerate configuration is named, not left out
    table["degenerate_in"] = [_degenerate_in(unhealthy_a[n], unhealthy_b[n]) for n in names]
    table = table.sort_values(["rank_a", "configuration"]).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    for _ in range(draws):
        mean_a = matrix_a[:, rng.integers(matrix_a.shape[1], size=matrix_a.shape[1])].mean(axis=1)
        mean_b = matrix_b[:, rng.integers(matrix_b.shape[1], size=matrix_b.shape[1])].mean(axis=1)
        taus.append(kendall_tau_b(mean_a, mean_b))
        rhos.append(spearman_rho(mean_a, mean_b))
    interval = lambda v: tuple(float(q) for q in np.nanpercentile(v, [2.5, 97.5])) if draws else (np.nan, np.nan)  # noqa: E731
    return Transfer(table, kendall_tau_b(gold_a, gold_b), interval(taus), spearman_rho(gold_a, gold_b),
                    interval(rhos), draws)  # fmt: skip
