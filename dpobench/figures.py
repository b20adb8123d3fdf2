"""matplotlib figures of a sweep, as ``Figure`` objects (no pyplot state). Each has a title, axis labels
and units (a metric's, from the catalogue: ``dpobench.metrics``). Every number drawn comes from the store (or, for the
geometry figures, from the analytic landscape); none is invented.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dpobench.metrics import METRICS
from dpobench.tables import resolve_metric
from dpobench.verdict import configuration_name

if TYPE_CHECKING:
    from dpobench.registry import Study
    from dpobench.verdict import Verdict

__all__ = [
    "beta_sensitivity",
    "frontier",
    "geometry",
    "hover_titles",
    "parameter_study",
    "rlhf",
    "robust_limits",
    "scenario_robustness",
    "throughput",
    "training_curves",
    "variant_colors",
]

A4_LANDSCAPE = (11.69, 8.27)
WIDE = (11.0, 6.5)


def variant_colors(variants: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A fixed colour per variant, the same in every figure of a report."""
    from matplotlib import colormaps

    names = sorted(set(variants))
    # tab20 less its two greys (grey means "the rest" in the figures), then tab20b's 20 distinguishable colours
    distinct = [colormaps["tab20"](i) for i in range(20) if i not in (14, 15)] + [
        colormaps["tab20b"](i) for i in range(20)
    ]
    return {name: distinct[i % len(distinct)] for i, name in enumerate(names)}


#: marker shapes, paired with the colours: with more variants than colours, (colour, shape) still tells them apart
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def variant_markers(colors: dict) -> dict[str, str]:
    """A marker per variant of ``colors`` (``variant_colors``' variants, in its order): a different shape for each
    variant that shares a colour with another (tab20 and tab20b repeat hues beyond 20)."""
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(sorted(colors))}


def _legend(fig: Figure, handles_from, ncol: int = 1) -> None:
    """The figure's legend outside its panels, on the right (constrained layout makes room for it)."""
    handles, labels = handles_from.get_legend_handles_labels()
    last = [i for i, label in enumerate(labels) if label.startswith("others (")]  # the grey lines' entry: last
    order = [i for i in range(len(labels)) if i not in last] + last
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7, ncol=ncol, frameon=False)


#: with more variants than this, the training curves colour only ``highlight``'s and draw the rest in grey
CURVES_IN_COLOUR = 10


def training_curves(tidy: pd.DataFrame, colors: dict, scenario: str = "clean", beta: float | None = None,
                    highlight: Sequence[str] | None = None) -> Figure:  # fmt: skip
    """Loss, reward margin, reward accuracy and chosen/rejected rewards per step, one line per variant
    (mean over seeds, rolling mean over 10 steps) — the seed's "Training Dynamics" from real runs. With more than
    ``CURVES_IN_COLOUR`` variants, those of ``highlight`` (the report's best-ranked) are in colour and the others
    thin and grey, under one legend entry: 33 coloured lines could not be told apart."""
    steps = tidy[(tidy.source == "step") & (tidy.scenario == scenario)]  # the reference model has no steps
    if beta is None and len(steps):
        beta = float(steps.beta.mode().iloc[0])
    steps = steps[np.isclose(steps.beta, beta) | steps.beta.isna()] if beta is not None else steps
    fig = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    at = f", β = {beta:g}" if beta is not None else ""  # None: no cell recorded a step (every one failed first)
    fig.suptitle(f"Training dynamics ({scenario}{at}; mean over seeds, 10-step rolling mean)")
    axes = fig.subplots(2, 2)
    panels = [(m, METRICS[m].axis) for m in ("loss", "reward_margin", "reward_accuracy")]
    wide = steps.pivot_table(index=["variant", "step"], columns="metric", values="value", aggfunc="mean")
    drawn = [m for m, _ in panels] + ["chosen_reward", "rejected_reward"]
    wide = wide.reindex(columns=[*wide.columns, *(m for m in drawn if m not in wide)])  # one not measured: no line
    variants = wide.index.get_level_values("variant").unique()
    shown = set(variants) if highlight is None or len(variants) <= CURVES_IN_COLOUR else set(highlight) & set(variants)
    greyed = [v for v in variants if v not in shown]
    if greyed:
        fig.suptitle(f"Training dynamics ({scenario}, β = {beta:g}; mean over seeds, 10-step rolling mean; in colour the "
                     f"{len(shown)} best-ranked, in grey the other {len(greyed)})")  # fmt: skip

    ranked = {v: i for i, v in enumerate(highlight or ())}
    order = lambda v: (v in shown, ranked.get(v, 0), v)  # noqa: E731  grey first (drawn under), then by rank

    def style(variant: str, first: bool) -> dict:  # the grey lines share one legend entry, on the first of them
        if variant in shown:
            return {"color": colors.get(variant), "linewidth": 1.2, "zorder": 2, "label": variant}
        return {"color": "0.7", "linewidth": 0.6, "zorder": 1, "label": f"others ({len(greyed)})" if first else None}

    drawn_values: dict[int, dict[str, np.ndarray]] = {}  # panel → variant → what its lines drew
    for number, (ax, (metric, label)) in enumerate(zip(axes.flat, panels, strict=False)):
        # grey first, under the coloured lines; the legend lists the coloured ones, then one entry for the grey
        for i, variant in enumerate(sorted(variants, key=order)):
            series = wide.loc[variant][metric].rolling(10, min_periods=1).mean()
            ax.plot(series.index, series.values, **style(variant, i == 0))
            drawn_values.setdefault(number, {})[variant] = series.to_numpy(dtype=float)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].set_yscale("symlog", linthresh=1.0)  # IPO/SPPO/Cal-DPO losses are 10–100× DPO's: their own scale
    axes.flat[0].set_ylabel(f"{METRICS['loss'].axis}, symmetric log scale")
    ax = axes.flat[3]
    for variant in sorted(variants, key=order):
        chosen = wide.loc[variant]["chosen_reward"].rolling(10, min_periods=1).mean()
        rejected = wide.loc[variant]["rejected_reward"].rolling(10, min_periods=1).mean()
        kwargs = {**style(variant, False), "label": None}
        ax.plot(chosen.index, chosen.values, **kwargs)
        ax.plot(rejected.index, rejected.values, **{**kwargs, "linestyle": "--"})
        drawn_values.setdefault(3, {})[variant] = np.concatenate(
            [chosen.to_numpy(dtype=float), rejected.to_numpy(dtype=float)]
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("implicit reward (solid: chosen, dashed: rejected)")
    ax.grid(alpha=0.3)
    for number in (1, 3):  # margins and rewards: one diverging cell would flatten every other line
        _clip_to_robust_range(axes.flat[number], drawn_values.get(number, {}))
    _legend(fig, axes.flat[0], ncol=1 if len(shown) + bool(greyed) <= 18 else 2)
    return fig


def _clip_to_robust_range(ax, lines: dict[str, np.ndarray]) -> None:
    """Limit a panel to the robust range of its lines (``robust_limits``) and name, above it, the variants whose
    line leaves that range."""
    if not lines:
        return
    low, high = robust_limits(np.concatenate(list(lines.values())).tolist())
    ax.set_ylim(low, high)
    finite = {v: values[np.isfinite(values)] for v, values in lines.items()}
    outside = [v for v, values in finite.items() if ((values < low) | (values > high)).any()]
    if outside:
        ax.set_title("leaves the scale: " + ", ".join(sorted(outside)[:6]) + (" …" if len(outside) > 6 else ""),
                     fontsize=8)  # fmt: skip


def _quality_panel(table: pd.DataFrame) -> tuple[str, str]:
    """The metric the report ranks by unless told (the gold reward; for pairs from ``--data``, which have no gold
    reward model, the held-out implicit-reward accuracy), with its axis label."""
    metric = resolve_metric(table, None)
    return metric, METRICS[metric].axis


def beta_sensitivity(table: pd.DataFrame, colors: dict, scenario: str = "clean") -> Figure:
    """Final loss, reward margin, gold reward and KL against β (log axis), one line per variant —
    the seed's "DPO Variant Sensitivity to Beta" and "Beta vs Reward Margin" from real runs."""
    data = table[(table.scenario == scenario) & table.beta.notna()]
    fig = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    fig.suptitle(f"β sensitivity at the end of training ({scenario}; mean over seeds, bars: 95% CI)")
    axes = fig.subplots(2, 2)
    panels = [("loss", f"final {METRICS['loss'].axis}"), ("reward_margin", f"final {METRICS['reward_margin'].axis}"),
              _quality_panel(table), ("kl_to_reference", METRICS["kl_to_reference"].axis)]  # fmt: skip
    for ax, (metric, label) in zip(axes.flat, panels, strict=True):
        for variant, group in data.groupby("variant"):
            group = group.sort_values("beta")
            ci = group.get(f"{metric}_ci")
            ax.errorbar(group.beta, group[metric], yerr=None if ci is None or ci.isna().all() else ci.fillna(0),
                        color=colors.get(variant), label=variant, marker="o", markersize=3, linewidth=1.2, capsize=2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("β (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes.flat[0], ncol=1 if data.variant.nunique() <= 18 else 2)
    return fig


#: the figure attribute holding each hover title: SVG group id → text (``hover_titles``; the HTML report adds them)
_HOVER = "_dpobench_hover_titles"


def hover_titles(fig: Figure) -> dict[str, str]:
    """The hover titles of a figure's points: the SVG id of each point's group → its text (plain, unescaped: the
    HTML report escapes it into an SVG ``<title>``)."""
    return dict(getattr(fig, _HOVER, {}))


def _hover(fig: Figure, artist: object, text: str) -> None:
    titles = getattr(fig, _HOVER, None)
    if titles is None:
        titles = {}
        setattr(fig, _HOVER, titles)
    gid = f"dpobench-point-{len(titles)}"
    artist.set_gid(gid)
    titles[gid] = text


def robust_limits(values: Sequence[float], fence: float = 3.0) -> tuple[float, float]:
    """Axis limits that hold every value but the far outliers: the values within ``fence`` interquartile ranges of
    the quartiles, padded by 5%. One diverging cell (a reward of −7 among values near 0) no longer flattens the rest;
    the caller names what falls outside."""
    data = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if data.size == 0:
        return (0.0, 1.0)
    q1, q3 = np.percentile(data, [25, 75])
    spread = q3 - q1
    inside = data[(data >= q1 - fence * spread) & (data <= q3 + fence * spread)] if spread > 0 else data
    low, high = float(inside.min()), float(inside.max())
    pad = 0.05 * (high - low) if high > low else max(abs(high) * 0.05, 0.05)
    return (low - pad, high + pad)


def frontier(table: pd.DataFrame, colors: dict, reference_gold: float | None, scenario: str = "clean",
             decided: Verdict | None = None, own: Collection[str] = ()) -> Figure:  # fmt: skip
    """Gold reward against KL to the reference: one point per configuration × β. The Pareto set of the verdict
    (``decided``) and the reader's own plugins' variants (``own``) are in colour, with 95% bars, and named in a
    column beside the points; the other healthy configurations are grey dots and the degenerate ones grey crosses.
    Each point has a hover title (``hover_titles``) with its name and numbers; a line joins one variant's β values
    where it ran several. The gold reward is bounded (−1…1), so no point is off the scale."""
    data = table[table.scenario == scenario].copy()
    data["name"] = [configuration_name(row) for _, row in data.iterrows()]
    pareto = set(decided.pareto) if decided else set()
    degenerate = set(decided.degenerate) if decided else set()
    picks: dict[str, str] = {}
    for name, pick in ((decided.most_reward, "most reward"), (decided.least_drift, "least drift")) if decided else ():
        picks[name] = f"{picks[name]}, {pick}" if name in picks else pick
    labelled = data.name.isin(pareto) | data.variant.isin(set(own))
    fig = Figure(figsize=WIDE, layout="constrained")
    ax = fig.subplots()
    markers = variant_markers(colors)
    several = [v for v, g in data.groupby("variant") if g.beta.nunique() > 1]
    for variant in several:  # under the points
        group = data[data.variant == variant].sort_values("kl_to_reference")
        shown = labelled[group.index].any()
        ax.plot(group.kl_to_reference, group.gold_reward, color=colors.get(variant) if shown else "0.8", linewidth=0.8,
                zorder=1)  # fmt: skip
    for index, row in data.iterrows():
        ci = row.get("gold_reward_ci", math.nan)
        if labelled[index]:
            style = {"color": colors.get(row.variant), "marker": markers.get(row.variant, "o"), "markersize": 6,
                     "zorder": 3, "yerr": None if pd.isna(ci) else [ci], "capsize": 2, "elinewidth": 0.6}  # fmt: skip
        elif row["name"] in degenerate:
            style = {"color": "0.6", "marker": "x", "markersize": 5, "zorder": 2}
        else:
            style = {"color": "0.7", "marker": "o", "markersize": 4, "zorder": 2}
        bars = ax.errorbar([row.kl_to_reference], [row.gold_reward], linestyle="none", **style)
        grammatical = row.get("grammatical_fraction", math.nan)
        _hover(fig, bars.lines[0], f"{row['name']}: gold {row.gold_reward:+.3f}" + ("" if pd.isna(ci) else f" ± {ci:.3f}")
               + f", KL {row.kl_to_reference:.2f}" + ("" if pd.isna(grammatical) else f", {grammatical:.0%} grammatical")
               + (f" ({picks[row['name']]})" if row["name"] in picks else ""))  # fmt: skip
    if reference_gold is not None and not math.isnan(reference_gold):
        ax.axhline(reference_gold, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("symlog", linthresh=1.0)
    largest = float(data.kl_to_reference.max()) if len(data) else 1.0
    # room right of the largest KL (symlog: a factor, not an offset), so that its marker is not cut at the frame
    ax.set_xlim(left=min(0.0, float(data.kl_to_reference.min()) if len(data) else 0.0), right=max(1.0, largest) * 1.6)
    _name_points(ax, data[labelled], picks)
    ax.set_xlabel(f"{METRICS['kl_to_reference'].axis}, symmetric log scale")
    ax.set_ylabel(METRICS["gold_reward"].axis)
    ax.set_title(
        f"Gold reward vs KL ({scenario}; bars: 95% CI" + ("; a line joins one variant's β values)" if several else ")")
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=_frontier_key(reference_gold, bool(own), bool(degenerate)), fontsize=7, loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False)  # fmt: skip
    return fig


def rlhf(table: pd.DataFrame, tidy: pd.DataFrame, colors: dict, reference_gold: float, scenario: str) -> Figure:
    """DPO vs RLHF (``tables.rlhf_table``): every configuration's gold reward against its KL (95% bars; a line joins a
    variant's β values, and best-of-N's sample counts in order), the learned reward of the same samples against the
    same KL (over-optimisation: the learned reward climbing where the gold one does not), and the on-policy methods'
    training curves at one β (the one nearest 0.1 they ran): the learned reward and the KL of each step's samples,
    means over seeds."""
    fig = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    (gold_ax, proxy_ax), (reward_ax, kl_ax) = fig.subplots(2, 2)
    markers = variant_markers(colors)
    for ax, metric in ((gold_ax, "gold_reward"), (proxy_ax, "proxy_reward")):
        drawn = table[table[metric].notna()]
        for variant, group in drawn.groupby("variant", sort=False):  # under the points: a variant's β values
            if len(group) > 1:
                group = group.sort_values("kl_to_reference")
                ax.plot(group.kl_to_reference, group[metric], color=colors.get(variant), linewidth=0.8, zorder=1)
        sampled = drawn[drawn.kind == "best-of-N sampling"].sort_values("kl_to_reference")
        if len(sampled) > 1:
            ax.plot(sampled.kl_to_reference, sampled[metric], color="0.5", linewidth=0.8, zorder=1,
                    label="best-of-N, N in order")  # fmt: skip
        for _, row in drawn.iterrows():
            ci = row.get(f"{metric}_ci", math.nan)
            bars = ax.errorbar([row.kl_to_reference], [row[metric]], yerr=None if pd.isna(ci) else [ci], capsize=2,
                               linestyle="none", color=colors.get(row.variant), marker=markers.get(row.variant, "o"),
                               markersize=6, elinewidth=0.6, zorder=3)  # fmt: skip
            beta = "" if pd.isna(row.beta) else f" β={row.beta:g}"
            _hover(fig, bars.lines[0], f"{row.variant}{beta} ({row.kind}): {metric} {row[metric]:+.3f}, KL "
                                       f"{row.kl_to_reference:.2f}")  # fmt: skip
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"{METRICS['kl_to_reference'].axis}, symmetric log scale")
        ax.set_ylabel(METRICS[metric].axis)
        ax.grid(alpha=0.3, which="both")
    for variant in dict.fromkeys(table.variant):  # one legend entry per variant, whatever its β values
        gold_ax.plot(
            [], [], linestyle="none", color=colors.get(variant), marker=markers.get(variant, "o"), label=variant
        )
    if not math.isnan(reference_gold):
        gold_ax.axhline(reference_gold, color="black", linestyle=":", linewidth=1)
    several = table.beta.nunique() > 1
    gold_ax.set_title(f"Gold reward vs KL ({scenario}; 95% CI" + ("; lines join β values)" if several else ")"),
                      fontsize=10)  # fmt: skip
    proxy_ax.set_title("Learned (proxy) reward of the same samples vs KL", fontsize=10)
    steps = tidy[(tidy.source == "step") & (tidy.scenario == scenario) & tidy.variant.isin(set(table.variant))]
    steps = steps[steps.metric.isin(["rollout_reward", "rollout_kl"])]
    betas = sorted(set(steps.beta.dropna()))
    beta = min(betas, key=lambda b: abs(math.log(b / 0.1))) if betas else math.nan
    steps = steps[steps.beta == beta]
    for ax, metric in ((reward_ax, "rollout_reward"), (kl_ax, "rollout_kl")):
        curves = steps[steps.metric == metric].groupby(["variant", "step"]).value.mean()
        for variant in curves.index.get_level_values(0).unique():
            curve = curves[variant]
            ax.plot(curve.index, curve.values, color=colors.get(variant), linewidth=1, label=variant)
        ax.set_xlabel("training step")
        ax.set_ylabel(METRICS[metric].axis)
        ax.grid(alpha=0.3)
    at = "" if math.isnan(beta) else f"β = {beta:g}, "
    reward_ax.set_title(f"Learned reward of each step's samples ({at}seeds' mean)", fontsize=10)
    kl_ax.set_title(f"KL of each step's samples ({at}seeds' mean)", fontsize=10)
    _legend(fig, gold_ax)
    return fig


#: how many named points the frontier's column of names holds; past it, the lowest-ranked are named only on hover
MOST_NAMED = 16


def _name_points(ax, named: pd.DataFrame, picks: dict[str, str]) -> None:
    """The named points' names in a column at the right of the axes, best gold reward at the top, each joined to
    its point by a thin line: names placed beside clustered points would overlap, a column never does."""
    named = named.sort_values("gold_reward", ascending=False).head(MOST_NAMED)
    step = min(0.06, 0.9 / max(1, len(named)))
    for i, (_, row) in enumerate(named.iterrows()):
        text = row["name"] + (f" ({picks[row['name']]})" if row["name"] in picks else "")
        ax.annotate(text, (row.kl_to_reference, row.gold_reward), xytext=(0.72, 0.96 - i * step),
                    textcoords="axes fraction", fontsize=7, va="center", weight="bold" if row["name"] in picks else "normal",
                    arrowprops={"arrowstyle": "-", "color": "0.75", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3})  # fmt: skip


def _frontier_key(reference_gold: float | None, own: bool, degenerate: bool) -> list:
    """The frontier's legend: what each kind of point means (the points carry their own names)."""
    from matplotlib.lines import Line2D

    named = "in colour, named: the Pareto set (healthy)" + (" and your plugins" if own else "")
    key = [Line2D([], [], color="tab:blue", marker="o", linestyle="none", label=named)]
    key.append(Line2D([], [], color="0.7", marker="o", linestyle="none", label="other healthy configurations"))
    if degenerate:
        key.append(Line2D([], [], color="0.6", marker="x", linestyle="none", label="degenerate samples"))
    if reference_gold is not None and not math.isnan(reference_gold):
        key.append(Line2D([], [], color="black", linestyle=":", label="SFT reference"))
    return key


def scenario_robustness(scenarios: pd.DataFrame, colors: dict) -> Figure:
    """Gold-reward change under 20% label noise and length change under a length-biased labeller."""
    panels = [(c, label) for c, label in [("gold_reward_noisy_delta", "Δ gold reward, noisy − clean"),
                                          ("length_biased_delta", "Δ response length (tokens), length-biased − clean")]
              if c in scenarios]  # fmt: skip
    fig = Figure(figsize=WIDE, layout="constrained")
    fig.suptitle("Robustness: what each scenario changes, per variant and β (means over seeds)")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels))))
    for ax, (column, label) in zip(axes, panels, strict=False):
        data = scenarios.dropna(subset=[column]).sort_values(column)
        names = [v if math.isnan(b) else f"{v} β={b:g}" for v, b in zip(data.variant, data.beta, strict=True)]
        ax.barh(names, data[column], color=[colors.get(v) for v in data.variant])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    return fig


def throughput(costs: pd.DataFrame, colors: dict, device: str, memory: pd.DataFrame | None = None,
               bench: pd.DataFrame | None = None) -> Figure:  # fmt: skip
    """Each configuration's step cost measured side by side (``tables.step_cost_table``: the median over rounds of
    its step time over the round's median configuration, a line from the least to the most), CUDA's peak memory per
    variant, and a pytest-benchmark file's loss-kernel times over plain DPO's, each where given."""
    panels = [p for p, given in (("cost", len(costs) > 0), ("memory", memory is not None),
                                 ("bench", bench is not None and not bench.empty)) if given]  # fmt: skip
    fig = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    fig.suptitle(f"Step cost and memory, device: {device}")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    color = lambda name: colors.get(str(name).split("[")[0], "grey")  # noqa: E731  a configuration: its variant's
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "cost":
            # a dot at the median ratio and a line over its range: bars from 0 would hide differences of a few %
            for row, cost in enumerate(costs.itertuples(index=False)):
                ax.errorbar([cost.x_median], [row], xerr=[[cost.x_median - cost.x_low], [cost.x_high - cost.x_median]],
                            color=color(cost.configuration), marker="o", markersize=4, linewidth=1.2, capsize=2)  # fmt: skip
            names = [textwrap.fill(str(c), 40, break_long_words=False) + (f" ({d})" if d else "")
                     for c, d in zip(costs.configuration, costs.differs, strict=True)]  # fmt: skip
            ax.set_yticks(np.arange(len(costs)), names)
            ax.set_ylim(len(costs) - 0.4, -0.6)  # cheapest at the top, as in the table
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel(
                "step time / the median configuration's, same round (dot: median, line: least to most over rounds)"
            )
        elif panel == "memory":
            data = memory.sort_values("peak_memory_mb")
            ax.barh(data.variant, data.peak_memory_mb, color=[color(v) for v in data.variant])
            ax.set_xlabel(METRICS["peak_memory_mb"].axis)
        else:
            data = bench.sort_values("x_baseline")
            ax.barh(data.variant, data.x_baseline, color=[color(v) for v in data.variant])
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel("loss fwd+bwd time / plain DPO (pytest-benchmark)")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    return fig


def geometry(landscape: pd.DataFrame, colors: dict, family: str, margin_for_beta: float = 2.0,
             betas: dict[str, float] | None = None) -> Figure:  # fmt: skip
    """Loss and gradient weight against the log-ratio margin (each variant at the β it trained with, ``betas``,
    else its default β), and the preference probability against β — the seed's "DPO Loss Landscape" and "Beta vs
    Preference Strength"."""
    data = landscape[landscape.plugin == family]
    betas = betas or {}
    fig = Figure(figsize=WIDE, layout="constrained")
    fig.suptitle(f"Model-free geometry, plugin '{family}' (analytic, no training)")
    axes = fig.subplots(1, 3)
    drawn = []
    for variant, group in data.groupby("variant"):
        trained = group[np.isclose(group.beta, betas[variant])] if variant in betas else group.iloc[:0]
        default = group[group.beta_is_default.astype(bool)]
        curve = next((c for c in (trained, default) if len(c)), None)
        curve = curve if curve is not None else group[np.isclose(group.beta, group.beta.iloc[0])]
        drawn.append(curve)
        beta = curve.beta.iloc[0]
        label = f"{variant} (β={beta:g})" if not math.isnan(beta) else variant
        axes[0].plot(curve.margin, curve.loss, color=colors.get(variant), label=label)
        axes[1].plot(curve.margin, curve.grad_weight, color=colors.get(variant))
        at = group[np.isclose(group.margin, margin_for_beta)].sort_values("beta")
        axes[2].plot(at.beta, at.preference_prob, color=colors.get(variant), marker="o", markersize=2)
    axes[0].set(xlabel="log-ratio margin h = Δc − Δr (nats)", ylabel="loss per pair (nats)", title="loss")
    axes[1].set(xlabel="log-ratio margin h (nats)", ylabel="−∂loss/∂h", title="gradient weight")
    axes[2].set(
        xlabel="β (log scale)", ylabel="σ(r_c − r_r)", title=f"preference probability at h = {margin_for_beta:g}"
    )
    axes[2].set_xscale("log")
    curves = pd.concat(drawn) if drawn else data
    for ax, column in ((axes[0], "loss"), (axes[1], "grad_weight")):
        # Exponential losses (forward-KL f-DPO) reach 1e3 at the grid's edge: clip to what most drawn curves span
        # (the curves drawn only: a β nobody trained, Cal-DPO's 0.01 say, set the scale before)
        values = curves[column].replace([np.inf, -np.inf], np.nan).dropna()
        if len(values):
            low, high = np.percentile(values, [2, 95])
            pad = 0.1 * (high - low or 1.0)
            ax.set_ylim(low - pad, high + pad)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, frameon=False)
    return fig


def parameter_study(finals: pd.DataFrame, variant: str, study: Study) -> Figure | None:
    """The configurations of ``variant`` that its ``study`` compares (``LossSpec.study``: the values of its
    ``params``), one bar per configuration in each panel (means over its cells), if two or more ran. Configurations
    in the order of the study's labels, then the unlabelled ones by name."""
    name = finals.loss_name if "loss_name" in finals else finals.variant  # the report labels configurations
    cells = finals[(name == variant) & (finals.status == "done")].copy()
    if cells.empty:
        return None
    params = cells.params.map(lambda p: json.loads(p) if isinstance(p, str) and p else {})
    cells["configuration"] = [study.label({k: p.get(k) for k in study.params}) for p in params]
    if cells.configuration.nunique() < 2:  # one configuration is no study: nothing to compare it with
        return None
    panels = [(m, METRICS[m].axis) for m in ("loss", "reward_margin", "reward_accuracy")] + [_quality_panel(cells)]
    grouped = cells.groupby("configuration")[[m for m, _ in panels]].mean()
    labelled = [label for label in study.labels.values() if label in grouped.index]
    grouped = grouped.reindex(labelled + sorted(set(grouped.index) - set(labelled)))
    fig = Figure(figsize=WIDE, layout="constrained")
    fig.suptitle(study.title or f"{variant}: each configuration of {', '.join(study.params)} (means over its cells)")
    axes = fig.subplots(1, len(panels))
    for ax, (column, label) in zip(axes, panels, strict=True):
        ax.bar(grouped.index, grouped[column], color="tab:blue")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return fig
