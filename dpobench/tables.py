"""pandas views on the results store: the tables of a sweep. One tidy (long) frame feeds every table and figure;
which metrics exist, and which way each is better, is the catalogue's (``dpobench.metrics``).

Across seeds: the mean and a 95% Student-t interval (mean ± t₀.₉₇₅,ₙ₋₁ · s/√n). With one seed the
interval of the gold reward is the sampling interval 1.96 · SE of its 256 samples; other metrics then
have none. A ranking calls a tie a tie: variants whose intervals overlap the interval of the best
variant of their group share its rank (competition ranking, "1, 1, 3").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpobench.data import desirable_ratio
from dpobench.metrics import METRICS, RANK_BY, SUMMARY, TERMINAL, by_source
from dpobench.store import Store

__all__ = [
    "T_975",
    "aggregate",
    "beta_table",
    "cell_finals",
    "glossary_table",
    "has_gold",
    "is_reference",
    "paired_rank",
    "rank",
    "read_samples",
    "read_tidy",
    "resolve_metric",
    "run_info",
    "scenario_table",
    "step_cost_table",
    "summary_csv",
    "summary_table",
    "throughput_table",
    "unpaired_table",
    "variant_table",
]

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip

#: a cell's provenance, as the tidy frame and ``summary.csv`` carry it (``role`` follows the metrics in the finals)
CELL_COLUMNS = ["run_id", "cell_id", "variant", "plugin", "plugin_version", "params", "beta", "seed", "scenario",
                "model", "device", "dtype", "config", "status", "error"]  # fmt: skip


def t_quantile(df: int) -> float:
    return T_975[df - 1] if 1 <= df <= len(T_975) else 1.96


def is_reference(frame: pd.DataFrame) -> pd.Series:
    """Which rows are the reference model's (its cells' ``role``), not a trained configuration's."""
    return frame.role == "reference" if "role" in frame else pd.Series(False, index=frame.index)


def _key(values: Sequence[Any]) -> tuple:
    """A group's key with NaN as None (a variant without β has NaN there, and NaN equals nothing, not even NaN)."""
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in values)


def read_tidy(store: str | Path) -> pd.DataFrame:
    """One row per cell × step × metric (``source`` = step or eval), with provenance, the cell's ``role`` and
    versions. ``store``: a results store's file or its output directory."""
    with Store(store, readonly=True) as results:
        cells, runs, values = results.cells(), results.runs(), results.measurements()
    runs = runs[["run_id", "dpobench_version", "torch_version", "transformers_version", "git_commit", "model_hash"]]
    # A cell that failed before its first step has no values; it keeps one row (metric NaN) so that no
    # failure disappears from the tables.
    frame = (
        cells.drop(columns="model_hash").merge(values, on="cell_id", how="left").merge(runs, on="run_id", how="left")
    )
    return frame[[*CELL_COLUMNS, "role", "dpobench_version", "torch_version", "transformers_version", "git_commit",
                  "model_hash", "source", "step", "metric", "value"]]  # fmt: skip


def cell_finals(tidy: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: training metrics averaged over the last 10% of steps (rates as the window's work over its
    time), evaluation metrics at the last evaluation; the provenance columns first, every catalogue metric (training's,
    then evaluation's, each by name) and last the cell's ``role``. ``summary_csv`` leaves the role out."""
    provenance = CELL_COLUMNS[:1] + CELL_COLUMNS[2:]
    info = tidy.drop_duplicates("cell_id").set_index("cell_id")[[*provenance, "role"]]
    steps = tidy[tidy.source == "step"]
    if len(steps):
        last = steps.groupby("cell_id").step.transform("max")
        window = (last // 10).clip(lower=1)
        tail = steps[steps.step > last - window]
        train = tail.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="mean")
        train = _window_throughput(tail, train)
    else:
        train = pd.DataFrame(index=info.index)
    evals = tidy[tidy.source == "eval"]
    if len(evals):
        final = evals[evals.step == evals.groupby("cell_id").step.transform("max")]
        evaluation = final.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first", dropna=False)
    else:
        evaluation = pd.DataFrame(index=info.index)
    frame = info.join(train).join(evaluation)
    metrics = [*by_source("step"), *by_source("eval")]
    # a metric the catalogue does not know (a store written by a dpobench with more) is kept, after the known ones
    unknown = sorted(set(frame.columns) - set(info.columns) - set(metrics))
    return frame.reindex(columns=[*provenance, *metrics, *unknown, "role"]).reset_index()


def summary_csv(finals: pd.DataFrame) -> pd.DataFrame:
    """The finals as ``summary.csv`` holds them: provenance and metrics, without the ``role`` the views filter by
    (the reference's row is labelled by its ``variant``)."""
    return finals.drop(columns=[c for c in ("role", "configuration", "loss_name") if c in finals])


def _window_throughput(tail: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The window's rates (``Metric.rate``: pairs/s, tokens/s) as work over time (Σ work / Σ seconds), not the mean
    of per-step rates, which one fast step dominates and which would then disagree with the window's mean step time."""
    rated = [name for name, m in METRICS.items() if m.rate]
    rates = tail[tail.metric.isin([*rated, "step_time_ms"])]
    rates = rates.pivot_table(index=["cell_id", "step"], columns="metric", values="value", aggfunc="mean")
    if "step_time_ms" not in rates:
        return train
    seconds = rates.step_time_ms / 1e3
    total = seconds.groupby(level="cell_id").sum()
    for metric in rated:
        if metric in rates:
            train[metric] = (rates[metric] * seconds).groupby(level="cell_id").sum() / total
    return train


def configuration_labels(finals: pd.DataFrame) -> pd.Series:
    """``variant`` alone, or ``variant[key=value, ...]`` with what varies between its cells besides β and the
    seed: loss parameters, training settings (runs with other steps or lr), the model, the device or the plugin's
    version (its code). Cells
    that differ in more than their seed are never pooled as if they were seeds."""

    def settings(row: pd.Series) -> dict[str, object]:
        loads = lambda v: json.loads(v) if isinstance(v, str) and v else {}  # noqa: E731
        extra = {k: row[k] for k in ("model", "device", "dtype", "plugin_version") if k in row}
        return {**loads(row.get("config")), **extra, **loads(row.get("params"))}

    params = finals.apply(settings, axis=1) if len(finals) else pd.Series(dtype=object)
    labels = finals.variant.copy()
    for variant, index in finals.groupby("variant").groups.items():
        dicts = [params[i] for i in index]
        keys = sorted({k for d in dicts for k in d if k != "beta" and len({json.dumps(x.get(k)) for x in dicts}) > 1})
        if keys:
            for i in index:
                labels[i] = f"{variant}[{', '.join(f'{k}={params[i].get(k)}' for k in keys)}]"
    return labels


def aggregate(
    finals: pd.DataFrame, metrics: list[str], by: tuple[str, ...] = ("variant", "configuration", "beta", "scenario")
) -> pd.DataFrame:
    """Per group (seeds pooled): n seeds, failed cells, and per metric its mean and 95% half-width ``<metric>_ci``:
    Student-t over seeds, or for one seed the sampling interval 1.96 · SE where the catalogue names the metric's
    standard error (``Metric.se``)."""
    if "configuration" in by and "configuration" not in finals:
        finals = finals.assign(configuration=configuration_labels(finals))
    rows = []
    for key, group in finals.groupby(list(by), dropna=False, sort=False):
        done = group[group.status == "done"]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["seeds"] = len(done)
        row["failed"] = int((group.status != "done").sum())
        for metric in metrics:
            values = done[metric].dropna()
            row[metric] = values.mean() if len(values) else math.nan
            se = METRICS[metric].se if metric in METRICS else None
            if len(values) > 1:
                row[f"{metric}_ci"] = t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
            elif len(values) == 1 and se in done and not math.isnan(done[se][values.index[0]]):
                row[f"{metric}_ci"] = 1.96 * float(done[se][values.index[0]])  # the se of that very cell
            else:
                row[f"{metric}_ci"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def read_samples(store: str | Path, metric: str = RANK_BY[0]) -> pd.DataFrame:
    """``metric`` per evaluation prompt at each cell's last evaluation (a metric with ``Metric.per_prompt``):
    ``cell_id``, ``prompt`` and a column named ``metric``. Empty for cells that did not measure it (no gold reward
    with pairs from ``--data``) and for stores written before the per-prompt values were kept."""
    with Store(store, readonly=True) as results:
        return results.prompt_values(metric).rename(columns={"value": metric})


def paired_rank(
    table: pd.DataFrame, metric: str, samples: dict[Any, np.ndarray]
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Ranks by ``metric`` (higher is better) from each row's per-prompt values in ``samples`` (one array per row
    of ``table``, the same prompts in the same order): a row's rank is 1 + the number of rows better than it by
    their paired difference, prompt by prompt (its mean beyond the 95 % half-width, t over the prompts). Every
    pair is tested; no correction for their number. The cells were evaluated on the same prompts, so the prompt
    -to-prompt variation that unpaired intervals carry cancels. Also returns each row's paired gap to the row of
    the highest ``metric`` and its half-width (0 and NaN for that row). Rows without samples get no rank."""
    rows = [i for i in table.index if i in samples and not pd.isna(table.at[i, metric])]
    ranks = pd.Series(pd.NA, index=table.index, dtype="Int64")
    gap = pd.Series(math.nan, index=table.index)
    gap_ci = pd.Series(math.nan, index=table.index)
    if not rows:
        return ranks, gap, gap_ci

    def difference(a: Any, b: Any) -> tuple[float, float]:  # mean of a − b, its 95 % half-width
        d = samples[a] - samples[b]
        half = t_quantile(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        return float(d.mean()), float(half)

    for i in rows:
        better = 0
        for j in rows:
            if j != i:
                mean, half = difference(j, i)
                better += mean > half
        ranks[i] = 1 + better
    top = max(rows, key=lambda i: table.at[i, metric])
    for i in rows:
        gap[i], gap_ci[i] = (0.0, math.nan) if i == top else difference(top, i)
    return ranks, gap, gap_ci


def rank(table: pd.DataFrame, metric: str, higher_is_better: bool | None = None) -> pd.Series:
    """Competition ranks by ``metric``; a variant whose interval overlaps its group leader's shares the rank."""
    better = _higher_is_better(metric) if higher_is_better is None else higher_is_better
    order = table[metric].sort_values(ascending=not better, na_position="last").index
    ci = table.get(f"{metric}_ci", pd.Series(math.nan, index=table.index)).fillna(0.0)
    ranks = pd.Series(pd.NA, index=table.index, dtype="Int64")
    leader = None
    for position, index in enumerate(order, start=1):
        value = table.at[index, metric]
        if pd.isna(value):
            continue
        if leader is not None:
            lead_value, lead_ci = table.at[leader, metric], ci[leader]
            if abs(lead_value - value) <= lead_ci + ci[index]:  # the two intervals overlap
                ranks[index] = ranks[leader]
                continue
        leader = index
        ranks[index] = position
    return ranks


def _higher_is_better(metric: str) -> bool:
    return METRICS[metric].higher_is_better if metric in METRICS else True


def _needs_gold(metric: str) -> bool:
    return metric in METRICS and METRICS[metric].needs_gold


def has_gold(finals: pd.DataFrame) -> bool:
    """Whether any cell measured the synthetic task's gold reward model or grammar (``Metric.needs_gold``; cells
    trained on ``--data`` pairs have neither)."""
    return any(finals[m].notna().any() for m in finals.columns if _needs_gold(m))


def resolve_metric(finals: pd.DataFrame, metric: str | None) -> str:
    """The metric to rank by: ``metric``, or by default the first of ``metrics.RANK_BY`` the cells measured (the
    gold reward, or for pairs from ``--data`` the held-out implicit-reward accuracy). A gold metric asked of cells
    without one is refused (ValueError)."""
    if metric is None:
        gold = has_gold(finals)
        return next((m for m in RANK_BY if gold or not _needs_gold(m)), RANK_BY[-1])
    if _needs_gold(metric) and not has_gold(finals):
        fallback = resolve_metric(finals, None)
        raise ValueError(
            f"--metric {metric}: these cells trained on pairs from --data, which have no gold reward model; "
            f"rank by {fallback} (the default for them), kl_to_reference or loss"
        )
    return metric


def _parameters(params: object) -> str:
    """A cell's loss parameters as ``key=value, …``, β left out."""
    values = json.loads(params) if isinstance(params, str) and params else {}
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if k != "beta")


def _row_samples(
    table: pd.DataFrame, finals: pd.DataFrame, samples: pd.DataFrame | None, metric: str
) -> dict[Any, np.ndarray]:
    """Each summary row's per-prompt values of ``metric``, for rows of exactly one finished cell whose values were
    kept (several seeds are ranked by their t-intervals instead: those carry training's seed-to-seed spread)."""
    if samples is None or samples.empty or metric not in samples:
        return {}
    by_cell = {cell: group[metric].to_numpy(float) for cell, group in samples.groupby("cell_id")}
    done = finals[(finals.status == "done") & ~is_reference(finals)]
    keys = ["variant", "configuration", "beta", "scenario"]
    cells = {_key(key): list(group.cell_id) for key, group in done.groupby(keys, dropna=False, sort=False)}
    out = {}
    for index, row in table.iterrows():
        ids = cells.get(_key([row[k] for k in keys]), [])
        if len(ids) == 1 and ids[0] in by_cell:
            out[index] = by_cell[ids[0]]
    return out


def summary_table(finals: pd.DataFrame, metric: str | None = None, samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per variant × β × scenario at the end of training (the metrics of ``metrics.SUMMARY``), ranked by ``metric``
    (default: ``resolve_metric``'s) within each scenario. Without a gold reward (pairs from ``--data``), its columns are left out. With ``samples``
    (``read_samples`` of ``metric``, a metric kept per prompt; give them only for cells evaluated on the same
    prompts), a scenario whose ranked rows are one cell each, with samples of one length, is ranked by the metric's
    paired differences (``paired_rank``), and ``<metric>_gap`` ± ``<metric>_gap_ci`` give each row's paired gap to
    the best row."""
    metric = resolve_metric(finals, metric)
    metrics = list(SUMMARY)
    if not has_gold(finals):
        metrics = [m for m in metrics if not _needs_gold(m)]
    if metric not in metrics:  # any metric with a direction can rank: step_time_ms, say
        metrics.append(metric)
    cells = finals[~is_reference(finals)]
    if "configuration" not in cells:
        cells = cells.assign(configuration=configuration_labels(cells))
    table = aggregate(cells, metrics)
    # every parameter each configuration trained with, besides β (its own column): the swept ones, and the rest
    shown = {(v, c): _parameters(p) for v, c, p in zip(cells.variant, cells.configuration, cells.params, strict=True)}
    table.insert(
        2, "parameters", [shown.get((v, c), "") for v, c in zip(table.variant, table.configuration, strict=True)]
    )
    table["rank"] = pd.Series(dtype="Int64")
    vectors = _row_samples(table, cells, samples, metric)
    gap, gap_ci = f"{metric}_gap", f"{metric}_gap_ci"
    for _, group in table.groupby("scenario"):
        ranked = group[(group.seeds > 0) & group[metric].notna()].index  # failed rows have no rank either way
        paired = [vectors.get(i) for i in ranked]
        if (
            len(paired) > 1
            and all(v is not None for v in paired)
            and len({len(v) for v in paired}) == 1
            and len(paired[0]) > 1
        ):
            ranks, gaps, gaps_ci = paired_rank(group, metric, {i: vectors[i] for i in ranked})
            table.loc[group.index, "rank"] = ranks
            table.loc[group.index, gap] = gaps
            table.loc[group.index, gap_ci] = gaps_ci
        else:
            table.loc[group.index, "rank"] = rank(group, metric)
    better = _higher_is_better(metric)
    columns = [c for c in table.columns if c not in ("rank", gap, gap_ci)]
    if gap in table:  # the paired gap beside the metric it ranks
        at = columns.index(f"{metric}_ci") + 1
        columns[at:at] = [gap, gap_ci]
    table = table[["rank", *columns]]  # the rank first: what the table is for
    return table.sort_values(["scenario", "rank", metric], ascending=[True, True, not better]).reset_index(drop=True)


def beta_table(finals: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """``metric`` (mean over seeds; default: ``resolve_metric``'s) for each variant (rows) at each β (columns), clean
    scenario first."""
    metric = resolve_metric(finals, metric)
    table = aggregate(finals[~is_reference(finals)], [metric])
    scenario = "clean" if "clean" in set(table.scenario) else table.scenario.iloc[0]
    return table[table.scenario == scenario].pivot_table(index="variant", columns="beta", values=metric)


def scenario_table(finals: pd.DataFrame) -> pd.DataFrame:
    """Per variant and β: the change of gold reward under label noise and of length under length bias,
    each scenario minus clean (means over seeds)."""
    table = aggregate(finals[~is_reference(finals)], ["gold_reward", "response_length", "kl_to_reference"])
    wide = table.pivot_table(index=["variant", "beta"], columns="scenario", values=["gold_reward", "response_length"])
    out = pd.DataFrame(index=wide.index)
    scenarios = set(table.scenario)
    if {"clean", "noisy"} <= scenarios:
        out["gold_reward_clean"] = wide["gold_reward"]["clean"]
        out["gold_reward_noisy_delta"] = wide["gold_reward"]["noisy"] - wide["gold_reward"]["clean"]
    if {"clean", "length-biased"} <= scenarios:
        out["length_clean"] = wide["response_length"]["clean"]
        out["length_biased_delta"] = wide["response_length"]["length-biased"] - wide["response_length"]["clean"]
    return out.reset_index()


def unpaired_table(finals: pd.DataFrame, clean: str = "clean pairs (1:1)") -> pd.DataFrame:
    """Per variant, configuration and β: gold reward and KL (means over seeds, 95% half-widths) in each scenario of
    the data's pairing, clean first (its ``data`` named ``clean``): a paired variant on the clean pairs, an unpaired
    one on them unrolled (1:1), or on a file's own unpaired rows; then on each ``unpaired-D:U`` scenario's examples.
    Empty without an unpaired scenario."""
    cells = finals[~is_reference(finals)]
    scenarios = [s for s in sorted(set(cells.scenario)) if desirable_ratio(s)]
    if not scenarios:
        return pd.DataFrame()
    table = aggregate(cells[cells.scenario.isin(["clean", *scenarios])], ["gold_reward", "kl_to_reference"])
    table["data"] = table.scenario.map(lambda s: s if s != "clean" else clean)
    order = {s: i for i, s in enumerate(["clean", *scenarios])}
    table = table.sort_values(
        ["variant", "configuration", "beta", "scenario"], key=lambda c: c.map(order) if c.name == "scenario" else c
    )
    columns = ["variant", "configuration", "beta", "data", "seeds", "gold_reward", "gold_reward_ci", "kl_to_reference",
               "kl_to_reference_ci"]  # fmt: skip
    return table[columns].reset_index(drop=True)


def lora_table(finals: pd.DataFrame, metric: str) -> pd.DataFrame:
    """LoRA against full fine-tuning: each variant × β × scenario × model that the store trained both ways, one row
    per LoRA setting (``lora``), with each way's ``metric`` and KL (means over seeds); on CUDA also each way's peak
    memory and LoRA's over full's (on the CPU a cell's peak is its process's so far, which compares nothing). Step
    times are left out: the two ways ran one after the other, not side by side (``benchmarks/lora_step.py`` times
    them interleaved). Empty where the store holds one way only. ``variant``: the loss's name (``loss_name`` where
    the report has put configuration labels there)."""
    cells = finals[~is_reference(finals) & (finals.status == "done")]
    if "loss_name" in cells:
        cells = cells.assign(variant=cells.loss_name)
    lora = cells.config.map(lambda c: json.loads(c).get("lora", "") if isinstance(c, str) and c else "")
    if not ((lora != "").any() and (lora == "").any()):
        return pd.DataFrame()
    keys = ["variant", "beta", "scenario", "model"]
    measures = [m for m in dict.fromkeys((metric, "kl_to_reference")) if m in cells]
    measures += ["peak_memory_mb"] if not cells.device.eq("cpu").any() and "peak_memory_mb" in cells else []
    means = cells.assign(lora=lora).groupby([*keys, "lora"], dropna=False)[measures].mean().reset_index()
    full = means[means.lora == ""].drop(columns="lora")
    table = means[means.lora != ""].merge(full, on=keys, suffixes=(" LoRA", " full"))
    if "peak_memory_mb" in measures:
        table["peak_memory_mb LoRA/full"] = table["peak_memory_mb LoRA"] / table["peak_memory_mb full"]
    return table.sort_values([*keys, "lora"]).reset_index(drop=True)


#: what kind of training a configuration is, read from what its cells measured (``method_kinds``)
KINDS = ("offline loss", "online preference", "on-policy RL", "best-of-N sampling")


def method_kinds(finals: pd.DataFrame) -> pd.Series:
    """Per cell, its kind (``KINDS``), from the store alone: a method (``dpobench.methods``) records the learned
    reward of its samples; best-of-N trains no step, online training a pair's implicit reward accuracy."""
    proxy = finals["proxy_reward"].notna() if "proxy_reward" in finals else pd.Series(False, index=finals.index)
    stepped = finals["loss"].notna() if "loss" in finals else pd.Series(False, index=finals.index)
    paired = finals["reward_accuracy"].notna() if "reward_accuracy" in finals else pd.Series(False, index=finals.index)
    kind = pd.Series(KINDS[0], index=finals.index)
    kind[proxy & ~stepped] = KINDS[3]
    kind[proxy & stepped & paired] = KINDS[1]
    kind[proxy & stepped & ~paired] = KINDS[2]
    return kind


def loss_spikes(tidy: pd.DataFrame) -> pd.Series:
    """Per cell, its training steps whose loss lies beyond Tukey's far-out fence, Q3 + 3·IQR of the cell's own
    losses: a loss that jumps, not one that merely trends."""
    losses = tidy[(tidy.source == "step") & (tidy.metric == "loss")]

    def spikes(values: pd.Series) -> int:
        q1, q3 = values.quantile(0.25), values.quantile(0.75)
        return int((values > q3 + 3 * (q3 - q1)).sum())

    return losses.groupby("cell_id").value.apply(spikes)


def rlhf_table(
    finals: pd.DataFrame, tidy: pd.DataFrame, runs: list[dict[str, Any]], seconds: pd.Series, scenario: str
) -> pd.DataFrame:
    """The seed's "DPO vs RLHF" comparison, measured: per configuration × β in ``scenario`` (means over seeds, 95%
    half-widths), its kind, gold reward, learned (proxy) reward and KL; the completions it sampled per cell (from the
    policy while training, or best-of-N's from the reference); the seconds it trained and evaluated per cell; the
    models it held (the runs' record); its parameters beside β; ``seconds``: each cell's wall time, by cell id; stability as the gold reward's spread over seeds (sd)
    and loss spikes per cell; on CUDA its peak memory. Empty where the store holds no method cell."""
    cells = finals[~is_reference(finals) & (finals.scenario == scenario)]
    kinds = method_kinds(cells)
    if (kinds == KINDS[0]).all():
        return pd.DataFrame()
    cells = cells.assign(kind=kinds, spikes=cells.cell_id.map(loss_spikes(tidy)))
    config = cells.config.map(lambda c: json.loads(c) if isinstance(c, str) and c else {})
    trained = config.map(lambda c: c.get("steps", math.nan) * 2 * c.get("batch_size", math.nan))
    cells["samples_drawn"] = trained.where(cells.kind.isin(KINDS[1:3]), 0.0)
    if "n_samples" in cells:
        cells.loc[cells.kind == KINDS[3], "samples_drawn"] = cells.n_samples
    evaluation = cells["eval_seconds"] if "eval_seconds" in cells else math.nan
    cells["train_seconds"] = cells.cell_id.map(seconds) - pd.Series(evaluation, index=cells.index).fillna(0.0)
    measures = [m for m in ("gold_reward", "proxy_reward", "kl_to_reference", "samples_drawn", "train_seconds",
                            "eval_seconds", "spikes", "peak_memory_mb") if m in cells]  # fmt: skip
    if cells.device.eq("cpu").any():
        measures = [m for m in measures if m != "peak_memory_mb"]  # a CPU cell's peak is its process's so far
    held: dict[tuple[str, str], str] = {}  # (variant, parameters) → the models its cells held, as runs recorded it
    for run in runs:
        info = run.get("info") if isinstance(run.get("info"), dict) else {}
        recorded = info.get("models") if isinstance(info, dict) else None
        for variant, params, models in recorded if isinstance(recorded, list) else []:
            held[variant, json.dumps(json.loads(params), sort_keys=True)] = ", ".join(models)
    cells["models"] = [held.get((v, json.dumps(json.loads(p), sort_keys=True)), "") if isinstance(p, str) else ""
                       for v, p in zip(cells.loss_name, cells.params, strict=True)]  # fmt: skip
    table = aggregate(cells, measures, by=("variant", "kind", "loss_name", "beta"))
    per_configuration = cells.groupby(["variant", "beta"], dropna=False)
    table = table.merge(per_configuration.gold_reward.std(ddof=1).rename("gold_reward_sd").reset_index(),
                        on=["variant", "beta"], how="left")  # fmt: skip
    table = table.merge(per_configuration.models.first().reset_index(), on=["variant", "beta"], how="left")
    parameters = (
        cells.drop_duplicates("variant")
        .set_index("variant")
        .params.map(
            lambda p: (
                ", ".join(f"{k}={v}" for k, v in json.loads(p).items() if k != "beta") if isinstance(p, str) else ""
            )
        )
    )
    table["parameters"] = table.variant.map(parameters).fillna("")
    order = {kind: i for i, kind in enumerate(KINDS)}
    table = table.sort_values(["kind", "gold_reward"], key=lambda c: c.map(order) if c.name == "kind" else -c)
    shown = ["variant", "kind", "beta", "seeds", "gold_reward", "gold_reward_ci", "gold_reward_sd", "proxy_reward",
             "kl_to_reference", "kl_to_reference_ci", "samples_drawn", "train_seconds", "eval_seconds", "spikes",
             "peak_memory_mb", "models", "parameters"]  # fmt: skip
    return table[[c for c in shown if c in table]].reset_index(drop=True)


def throughput_table(finals: pd.DataFrame) -> pd.DataFrame:
    """Training throughput and peak memory per variant (means over its cells), with the device. Peak memory only
    where a cell ran on CUDA: the CPU's is the process's peak so far, which a cell inherits from those before it."""
    cells = finals[~is_reference(finals) & (finals.status == "done")]
    columns = ["pairs_per_s", "tokens_per_s", "step_time_ms"]
    columns += ["peak_memory_mb"] if not cells.device.eq("cpu").all() else []
    table = cells.groupby(["variant", "device"], as_index=False)[columns].mean()
    return table.sort_values("pairs_per_s", ascending=False).reset_index(drop=True)


#: rounds from which "every round agrees" is a difference at 5%: a two-sided sign test, 2 × 0.5^6 = 0.031
SIGN_TEST_ROUNDS = 6


def step_cost_table(store: str | Path) -> pd.DataFrame:
    """The latest side-by-side step-cost measurement of a store (``dpobench.stepcost``), one row per configuration,
    cheapest first: ``configuration``, ``step_ms`` (median over rounds), ``x_median`` (its step time over the median
    configuration's in the same round, median over rounds), ``x_low`` / ``x_high`` (the least and most of those
    ratios), ``rounds``, and ``differs``: "cheaper" or "dearer" where every one of ``SIGN_TEST_ROUNDS`` or more rounds
    says so, else "" (the same cost within what the measurement can tell). ``attrs``: its ``run_id``. Empty where the
    store holds none."""
    columns = ["configuration", "step_ms", "x_median", "x_low", "x_high", "rounds", "differs"]
    with Store(store, readonly=True) as results:
        costs = results.step_costs()
    if costs.empty:
        return pd.DataFrame(columns=columns)
    run_id = costs.run_id.iloc[-1]  # oldest first: the last run that measured
    costs = costs[costs.run_id == run_id].copy()
    costs["ratio"] = costs.step_time_ms / costs.groupby("round").step_time_ms.transform("median")
    several = costs.groupby("variant").params.nunique()
    rows = []
    for (variant, params), group in costs.groupby(["variant", "params"], sort=False):
        shown = _parameters(params)
        ratios = group.ratio
        agree = len(ratios) >= SIGN_TEST_ROUNDS and ((ratios < 1).all() or (ratios > 1).all())
        rows.append({"configuration": f"{variant}[{shown}]" if several[variant] > 1 and shown else variant,
                     "step_ms": group.step_time_ms.median(), "x_median": ratios.median(), "x_low": ratios.min(),
                     "x_high": ratios.max(), "rounds": len(ratios),
                     "differs": ("cheaper" if (ratios < 1).all() else "dearer") if agree else ""})  # fmt: skip
    table = pd.DataFrame(rows, columns=columns).sort_values("x_median", kind="stable").reset_index(drop=True)
    table.attrs["run_id"] = run_id
    return table


def cell_seconds(store: str | Path) -> pd.Series:
    """Each cell's wall time (training and evaluation), by cell id."""
    with Store(store, readonly=True) as results:
        return results.cells().set_index("cell_id").seconds


def run_info(store: str | Path) -> list[dict[str, object]]:
    """The runs recorded in a store: configuration, device and versions."""
    with Store(store, readonly=True) as results:
        rows = results.runs().to_dict("records")
    for row in rows:
        row["config"] = json.loads(row["config"] or "{}")
        row["info"] = json.loads(row["info"] or "{}")
    return rows


def variant_table(finals: pd.DataFrame) -> pd.DataFrame:
    """The terminal summary: one formatted row per variant × β × scenario, the reference first. Its metrics are
    ``metrics.TERMINAL``'s, headed and formatted as the catalogue says; a metric with a standard error
    (``Metric.se``) shows its 95% interval. Without a gold reward (pairs from ``--data``), the metrics that need one
    are left out and the metric the report ranks by takes the place of the first of them."""
    gold = has_gold(finals)
    ranked_by = resolve_metric(finals, None)
    shown = [m for m in TERMINAL if gold or not _needs_gold(m)]
    if ranked_by not in shown:
        at = next((i for i, m in enumerate(TERMINAL) if _needs_gold(m)), len(TERMINAL))
        shown.insert(at, ranked_by)
    keys = ("variant", "configuration", "beta", "scenario")
    labelled = finals.assign(configuration=configuration_labels(finals)) if "configuration" not in finals else finals
    frame = aggregate(labelled.assign(reference=is_reference(labelled)), shown, by=("reference", *keys))
    statuses = {  # "failed", "diverged" or both, for the group's cells that did not finish
        _key(key): ", ".join(sorted(set(g.status) - {"done"}))
        for key, g in labelled.groupby(list(keys), dropna=False)
        if (g.status != "done").any()
    }
    frame = frame.sort_values(
        ["reference", "scenario", ranked_by], ascending=[False, True, not _higher_is_better(ranked_by)]
    )

    def fmt(value: float, spec: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    columns: dict[str, list[str]] = {"variant": list(frame.configuration), "β": [fmt(b, "g") for b in frame.beta],
                                     "scenario": list(frame.scenario)}  # fmt: skip
    for name in shown:
        metric = METRICS[name]
        if metric.se:
            columns[f"{metric.header} ± 95% CI"] = [
                "–" if math.isnan(v) else f"{format(v, metric.fmt)}±{format(c, metric.fmt.lstrip('+'))}"
                for v, c in zip(frame[name], frame[f"{name}_ci"], strict=True)
            ]
        else:
            columns[metric.header] = [fmt(v, metric.fmt) for v in frame[name]]
    columns["status"] = [
        statuses.get(_key(key), "ok")
        for key in zip(frame.variant, frame.configuration, frame.beta, frame.scenario, strict=True)
    ]
    table = pd.DataFrame(columns)
    if frame.scenario.nunique() <= 1:
        table = table.drop(columns="scenario")
    if not frame.failed.any():
        table = table.drop(columns="status")
    return table.reset_index(drop=True)


def glossary_table(metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """What each metric means, its unit and which way is better: the catalogue as a table (the report's glossary).
    ``metrics``: these, in this order (default: the whole catalogue)."""
    names = list(METRICS) if metrics is None else [m for m in metrics if m in METRICS]
    return pd.DataFrame(
        {
            "metric": names,
            "unit": [METRICS[m].unit or "–" for m in names],
            "better": [METRICS[m].better or "–" for m in names],
            "source": [METRICS[m].source for m in names],
            "meaning": [METRICS[m].doc for m in names],
        }
    )
