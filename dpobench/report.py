"""The report of a results store: a self-contained HTML page and an A4 PDF with the same content, built from the
tables (``dpobench.tables``) and figures (``dpobench.figures``) of the store's tidy frame."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

import dpobench
from dpobench import figures
from dpobench._util import atomic_path
from dpobench.metrics import METRICS
from dpobench.tables import (
    SIGN_TEST_ROUNDS,
    beta_table,
    cell_finals,
    cell_seconds,
    configuration_labels,
    glossary_table,
    has_gold,
    is_reference,
    lora_table,
    read_samples,
    read_tidy,
    resolve_metric,
    rlhf_table,
    run_info,
    scenario_table,
    step_cost_table,
    summary_table,
    throughput_table,
    unpaired_table,
)
from dpobench.transfer import transfers_within
from dpobench.verdict import DEGENERATE_RULE, NEAR_BEST, NO_PICK, decision_table, degenerate, verdict

__all__ = ["Report", "build_report", "read_benchmark_json", "write_report"]

VERDICT_RULES = (
    f"How these are chosen: a configuration with samples {DEGENERATE_RULE} is degenerate and never picked (a "
    "repetitive sample repeats a quarter or more of its word 3-grams); the Pareto set is the healthy configurations no other healthy one beats on both "
    "gold reward and KL; 'most reward' is the best-ranked healthy configuration (configurations of the same rank "
    f"differ within noise: ties); 'least drift' has the lowest KL among those keeping {NEAR_BEST:.0%} of the best "
    "gain in gold reward over the SFT reference. The picks hold for this model and task: rerun on yours (--model, "
    "--data) before trusting them there. The ranked summary below has every number."
)
PAIRED_RANK_RULE = (
    "Rank: 1 + the number of configurations better than this one beyond noise, compared prompt by prompt on the same "
    "held-out prompts (paired differences); equal ranks are ties, so a row can share a rank with, or outrank, one "
    "whose mean is a little higher."
)
INTERVAL_RANK_RULE = (
    "Rank: configurations whose 95% intervals overlap their rank's leader (its best) share the leader's rank (ties); "
    "the first that does not starts the next rank."
)
HONESTY = (
    "Every number in this report was measured by dpobench on the runs named below, or (model-free geometry) "
    "computed from each loss's formula. The tutorial notebook dpobench started from showed invented numbers "
    "(its RLHF 'Helpfulness' bars, its simulated memory use and training curves); none of those appear here."
)


def _columns_text(summary: pd.DataFrame) -> str:
    """The summary's metric columns, each with which way is better (the glossary below the table says the rest)."""
    shown = [m for m in summary.columns if m in METRICS]
    directions = [f"{m} ({METRICS[m].better} is better)" if METRICS[m].better else m for m in shown]
    return (f"Columns: {', '.join(directions)}; each is defined, with its unit, in the glossary below the table. "
            "Training's metrics are the means of its last 10% of steps. The SFT reference "
            "is the model every cell starts from, not the sft variant. ")  # fmt: skip


def _degenerate(summary: pd.DataFrame) -> str:
    """A sentence naming the configurations whose samples the task's grammar mostly rejects: their gold reward
    does not say they work."""
    if "grammatical_fraction" not in summary:
        return ""
    low = summary[summary.grammatical_fraction < 0.5]
    if low.empty:
        return ""
    names = ", ".join(f"{c} ({g:.0%})" for c, g in zip(low.configuration, low.grammatical_fraction, strict=True))
    return (f"Degenerate samples: under half of the samples of {names} are grammatical; read their gold reward "
            "with that in mind. ")  # fmt: skip


@dataclass
class Section:
    id: str
    title: str
    text: str = ""
    #: statements shown one per line above the text (the verdict's picks)
    lines: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    #: (term, definition) pairs shown below the tables: the glossary of the metrics
    glossary: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    title: str
    header: list[tuple[str, str]]
    sections: list[Section]
    #: one line under the title: what was compared, on what (the header has the full provenance)
    subtitle: str = ""


def read_benchmark_json(path: str | Path) -> pd.DataFrame:
    """A pytest-benchmark JSON as one row per benchmark, with ratios to the plain-DPO baseline."""
    try:
        data = json.loads(Path(path).read_text())
        rows = [
            {"variant": b.get("extra_info", {}).get("variant", b["name"]),
             "device": b.get("extra_info", {}).get("device", "?"), "median_ms": b["stats"]["median"] * 1e3}
            for b in data["benchmarks"]
        ]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--bench {str(path)!r}: not a pytest-benchmark JSON file ({error})") from None
    frame = pd.DataFrame(rows)
    base = frame[frame.variant == "baseline_plain_dpo"].set_index("device").median_ms
    frame["x_baseline"] = frame.median_ms / frame.device.map(base)
    return frame


def _fmt_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text: floats to 4 significant digits, anything missing (a failed cell's rank) as "–"."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = [("–" if pd.isna(v) else f"{v:.4g}") for v in out[column]]
        else:
            out[column] = [("–" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v))
                           for v in out[column]]  # fmt: skip
    return out


def _shown_config(config: object) -> object:
    """A run's configuration as the header shows it: with pairs from ``--data``, less the synthetic task's recipe and
    scenario settings, which that run did not use."""
    if isinstance(config, dict) and config.get("data"):
        return {k: v for k, v in config.items() if k not in ("data_recipe", "noise", "length_bonus")}
    return config


def _recorded_sources(runs: list[dict[str, object]]) -> dict[tuple[str, str], str]:
    """(plugin, version) → where the runs recorded it came from: "builtin", a distribution, or a loose file's path."""
    sources: dict[tuple[str, str], str] = {}
    for run in runs:
        info = run.get("info")
        for name, plugin in (info.get("plugins") or {}).items() if isinstance(info, dict) else ():
            sources[(name, str(plugin.get("version", "")))] = str(plugin.get("source", ""))
    return sources


def plugin_sources(finals: pd.DataFrame, runs: list[dict[str, object]]) -> str:
    """The plugins whose variants the cells trained, with their versions (a loose file's: the hash of its text) and,
    where a run recorded it, their source: "builtin", an installed distribution, or a loose file's path."""
    sources = _recorded_sources(runs)
    cells = finals.loc[~is_reference(finals), ["plugin", "plugin_version"]].dropna().drop_duplicates()
    pairs = sorted((str(p), str(v)) for p, v in cells.itertuples(index=False))
    return ", ".join(f"{p} {v}" + (f" ({sources[(p, v)]})" if sources.get((p, v)) else "") for p, v in pairs)


def own_variants(finals: pd.DataFrame, runs: list[dict[str, object]]) -> set[str]:
    """The variants (as the report labels them) whose plugin is not built into dpobench: the reader's own, which the
    figures name. A run that recorded no plugin sources (an older store) names none."""
    sources = _recorded_sources(runs)
    cells = finals[~is_reference(finals)]
    return {v for v, p, version in zip(cells.variant, cells.plugin, cells.plugin_version, strict=True)
            if sources.get((str(p), str(version)), "builtin") != "builtin"}  # fmt: skip


def batch_layout(runs: list[dict[str, object]]) -> str:
    """How the runs' training batches were laid out: a run's ``info`` records whether it shared each pair's prompt
    (runs from before it did record nothing, and did not)."""
    shared = {isinstance(info := r.get("info"), dict) and bool(info.get("share_prompt")) for r in runs}
    names = {True: "prompt shared (one row per pair)", False: "one row per sequence"}
    return " and ".join(names[layout] for layout in sorted(shared, reverse=True))


def _trained_weights(runs: list[dict[str, object]]) -> str:
    """Every weight, or LoRA's adapters with their share of the parameters, as each run trained."""
    said = set()
    for run in runs:
        lora = run["info"].get("lora") if isinstance(run.get("info"), dict) else None
        said.add(f"LoRA ({lora['settings']}): {lora['trainable']:,} of {lora['total']:,} parameters"
                 if isinstance(lora, dict) else "every weight (full fine-tuning)")  # fmt: skip
    return "; ".join(sorted(said))


def _gold_source(runs: list[dict[str, object]], gold: bool) -> str:
    """What produced the gold reward: the synthetic task's lexicon, a run's judge (``--judge``), or nothing."""
    judges = sorted(
        {str(r["info"]["judge"]) for r in runs if isinstance(r.get("info"), dict) and r["info"].get("judge")}
    )
    if judges:
        return "; ".join(judges)
    return "the synthetic task's sentiment lexicon (dpobench.task)" if gold else "none (pairs from --data, no --judge)"


def _run_setting(runs: list[dict[str, object]], key: str) -> str:
    """A sweep setting as the runs recorded it (the configuration's default where a run predates the key)."""
    from dpobench.config import SweepConfig

    default = getattr(SweepConfig(), key)
    return " or ".join(sorted({f"{r['config'].get(key, default):g}" for r in runs}))


def build_report(store: str | Path, metric: str | None = None, bench: str | Path | None = None) -> Report:
    """The report of a store, ranked by ``metric`` (None: ``resolve_metric``'s default, the gold reward where the
    cells have one). Without a gold reward (pairs from ``--data``) its columns and the gold-vs-KL figure are left
    out."""
    tidy = read_tidy(store)
    if tidy.empty:
        raise ValueError(f"{store}: the store holds no finished cells yet")
    finals, tidy = _label_configurations(cell_finals(tidy), tidy)
    metric = resolve_metric(finals, metric)
    gold = has_gold(finals)
    runs = run_info(store)
    variants = finals[~is_reference(finals)]
    colors = figures.variant_colors(variants.variant.unique())
    # cells pair by prompt only where they were evaluated on the same prompts: one data recipe for every run
    same_prompts = len({r.get("data_hash") for r in runs}) == 1
    per_prompt = same_prompts and metric in METRICS and METRICS[metric].per_prompt is not None
    summary = summary_table(finals, metric, read_samples(store, metric) if per_prompt else None)
    gap = f"{metric}_gap"
    paired = sorted(summary[summary[gap].notna()].scenario.unique()) if gap in summary else []
    unpaired = sorted(set(summary.scenario) - set(paired))
    reference = finals[is_reference(finals)]
    reference_gold = float(reference.gold_reward.mean()) if len(reference) else math.nan
    devices = ", ".join(sorted(set(finals.device.dropna())))
    scenarios = sorted(set(variants.scenario))
    main_scenario = "clean" if "clean" in scenarios else scenarios[0]
    shown = summary[summary.scenario == main_scenario]
    shown = shown[~degenerate(shown)]  # a degenerate configuration is never among the curves in colour
    best = shown.variant.drop_duplicates().head(8).tolist()  # ranked first

    header = [("runs", ", ".join(r["run_id"] for r in runs)), ("device", devices),
              ("dtype", ", ".join(sorted(set(finals["dtype"].dropna())))),
              ("model", ", ".join(sorted({f"{r['model']} ({r['model_hash']})" for r in runs}))),
              ("cells", f"{len(variants)} ({int((finals.status != 'done').sum())} failed or diverged)"),
              ("versions", ", ".join(sorted({f"dpobench {r['dpobench_version']}, torch {r['torch_version']}, "
                                             f"transformers {r['transformers_version']}" for r in runs}))),
              ("git commit", ", ".join(sorted({str(r["git_commit"]) for r in runs}))),
              ("plugins", plugin_sources(finals, runs)),
              ("configuration", "; ".join(json.dumps(_shown_config(r["config"]), sort_keys=True) for r in runs)),
              ("batch layout", batch_layout(runs)),
              ("gold reward by", _gold_source(runs, gold)), ("trained weights", _trained_weights(runs)),
              ("ranked by", metric), ("report by", f"dpobench {dpobench.__version__}")]  # fmt: skip
    sections = []
    decided = verdict(summary, reference_gold, most=None) if metric == "gold_reward" and gold else None
    if metric == "gold_reward" and gold:
        lines = decided.lines if decided else (NO_PICK,)
        table = decision_table(summary, decided)
        betas = table["β"].unique() if "β" in table else []
        if len(betas) == 1:  # one β for every row: said once, not in a column of the same number
            table = table.drop(columns="β")
        rank_rule = PAIRED_RANK_RULE if main_scenario in paired else INTERVAL_RANK_RULE
        sections.append(Section("verdict", "Which loss?", f"{rank_rule} The SFT reference every configuration starts "
                                f"from scores a gold reward of {reference_gold:+.3f} (KL 0); the variant named sft is "
                                "trained with the SFT loss on the chosen responses. " + VERDICT_RULES
                                + (f" Every configuration here trained at β = {betas[0]}." if len(betas) == 1 else ""),
                                lines=[line + "." for line in lines], tables=[("decision table", table)]))  # fmt: skip
    sections += [
        Section(
            "summary",
            "Summary",
            f"Per variant × β × scenario at the end of training: means over seeds with 95% confidence intervals "
            f"(`_ci` columns: Student-t over seeds; with one seed the gold-reward interval is 1.96 × the standard "
            f"error of its samples, which leaves out training's seed-to-seed spread (--seeds 0,1,2 measures it), and "
            f"other metrics have none). Ranked by {metric} within each scenario. "
            + (
                f"In {'scenario' if len(paired) == 1 else 'scenarios'} {', '.join(paired)}, every configuration is one "
                "cell evaluated on the same prompts, so a configuration's rank is 1 + the number of configurations "
                "better than it by their paired difference, prompt by prompt (its mean beyond its 95% half-width; each "
                f"pair tested, no correction for their number); {gap} ± {gap}_ci is the best "
                f"configuration's {metric} minus this one's, paired. "
                if paired
                else ""
            )
            + (
                f"{'In ' + ', '.join(unpaired) + ', v' if paired else 'V'}ariants whose intervals overlap share a rank. "
                if unpaired
                else ""
            )
            + (
                f"The SFT reference scores a gold reward of {reference_gold:+.3f}. "
                if gold
                else "The pairs came from --data, so there is no gold reward: heldout_reward_accuracy is the fraction of "
                "held-out pairs whose implicit reward prefers the chosen response. "
            )
            + _degenerate(summary)
            + _columns_text(summary)
            + HONESTY,
            tables=[("ranked summary", summary)],
            glossary=_glossary(summary),
        ),
        Section(
            "training",
            "Training dynamics",
            "Per-step metrics of every cell, from the store.",
            figures=[figures.training_curves(tidy, colors, main_scenario, highlight=best)],
        ),
    ]
    if finals.beta.nunique() > 1:
        sections.append(Section("beta", "β sensitivity", "Final metrics against β.",
                                figures=[figures.beta_sensitivity(summary, colors, main_scenario)],
                                tables=[(f"{metric} by β", beta_table(finals, metric).reset_index())]))  # fmt: skip
    if gold:
        sections.append(Section("frontier", "Gold reward vs KL", "The trade-off each configuration buys: its gold "
                                "reward against its KL from the reference (nats per completion). Up and left is better: "
                                "more reward for less divergence. The Pareto set of the verdict and your own plugins' "
                                "variants are named; in the HTML, every point names itself when the pointer rests on it.",
                                figures=[figures.frontier(summary, colors, reference_gold, main_scenario, decided,
                                                          own_variants(finals, runs))]))  # fmt: skip
    rlhf = _rlhf_section(store, finals, tidy, runs, colors, reference_gold, main_scenario)
    if rlhf is not None:
        sections.append(rlhf)
    if gold and variants.model.nunique() > 1:  # runs on other models into one store: does the ranking transfer?
        raw = finals.assign(variant=finals.loss_name)  # each model's own configuration labels
        for first, other, moved in transfers_within(raw, read_samples(store), main_scenario):
            table = moved.table.rename(columns={"gold_a": "gold A", "rank_a": "rank A", "gold_b": "gold B",
                                                "rank_b": "rank B", "degenerate_in": "degenerate in"})  # fmt: skip
            sections.append(Section(f"transfer-{len(sections)}", f"Does the ranking transfer? {other}",
                                    f"This store holds cells of more than one model: A is {first}, B is {other}; "
                                    f"each configuration both trained in {main_scenario}, ranked by its gold reward "
                                    f"in each. {moved.summary()}", tables=[("rankings", table)]))  # fmt: skip
    if {"noisy", "length-biased"} & set(scenarios) and "clean" in scenarios:
        table = scenario_table(finals)
        noise, bonus = (_run_setting(runs, key) for key in ("noise", "length_bonus"))
        sections.append(Section("scenarios", "Robustness", f"Noisy: a fraction {noise} of training labels flipped. "
                                f"Length-biased: the labeller adds {bonus} gold reward per token.",
                                figures=[figures.scenario_robustness(table, colors)], tables=[("scenario deltas", table)]))  # fmt: skip
    # a data file of unpaired rows (prompt, completion, label) records how many it held; pairs unrolled do not
    own_rows = any(isinstance(r.get("info"), dict) and "examples" in r["info"] for r in runs)
    unpaired = unpaired_table(finals, "the file's rows" if own_rows else "clean pairs (1:1)")
    if not unpaired.empty:
        sections.append(Section(
            "unpaired", "Unpaired data",
            "Unpaired variants (KTO, …) train on examples, each a prompt, one completion and a label: "
            + ("the data file's own unpaired rows, in clean at the file's desirable:undesirable ratio (a file of "
               "unpaired rows has no pairs, so no paired variant trained on it)" if own_rows else
               "in clean, every pair unrolled into a desirable and an undesirable example (1:1)")
            + "; in unpaired-D:U, the more plentiful side thinned to D:U (unpaired-1:10 keeps one desirable example "
            "for every ten undesirable ones). "
            + ("" if own_rows else "Paired variants train on the clean pairs. Every step sees as many completions "
               "(twice the batch size of pairs), drawn from the same pairs. ")
            + "Gold reward and KL are means over seeds with 95% intervals.",
            tables=[("unpaired data", unpaired)],
        ))  # fmt: skip
    lora = lora_table(finals, metric)
    if not lora.empty:
        sections.append(Section(
            "lora", "LoRA against full fine-tuning",
            f"The same variants, β, data and model, trained with LoRA adapters (the lora column's settings; only the "
            f"adapters train, and the reference is the base model) and with every weight: {metric} and KL, means over "
            f"seeds; on CUDA, each way's peak memory. Trained: {_trained_weights(runs)}. The two ways ran one after "
            "the other, so their step times are not compared here: benchmarks/lora_step.py times them side by side.",
            tables=[("LoRA against full fine-tuning", lora)],
        ))  # fmt: skip
    sections += _study_sections(finals)
    sections.append(_throughput_section(store, finals, colors, devices, bench))
    geometry = _geometry_section(finals, colors)
    if geometry is not None:
        sections.append(geometry)
    failed = finals[finals.status != "done"][["variant", "beta", "seed", "scenario", "status", "error"]]
    if len(failed):
        sections.append(
            Section("failures", "Failed and diverged cells", "Recorded, not hidden.", tables=[("cells", failed)])
        )
    seeds = variants.seed.nunique()
    subtitle = (f"{len(variants)} cells, {seeds} seed{'s' * (seeds != 1)}, model "
                f"{', '.join(sorted({str(r['model']) for r in runs}))} on {devices}; ranked by {metric}")  # fmt: skip
    return Report(title="dpobench report", header=header, sections=sections, subtitle=subtitle)


def _rlhf_section(
    store: str | Path, finals: pd.DataFrame, tidy: pd.DataFrame, runs: list[dict[str, object]], colors: dict,
    reference_gold: float, scenario: str,
) -> Section | None:  # fmt: skip
    """The seed notebook's "DPO vs RLHF", from measurements, where the store holds a method's cells
    (``dpobench.methods``): one table, its frontier and curves, and the DPO paper's finding checked both ways."""
    table = rlhf_table(finals, tidy, runs, cell_seconds(store), scenario)
    if table.empty:
        return None
    infos = [r["info"] for r in runs if isinstance(r.get("info"), dict)]
    learned = next((i["reward_models"][scenario] for i in infos if scenario in i.get("reward_models", {})), None)
    sft = next((i["sft_seconds"] for i in infos if "sft_seconds" in i), None)
    stages = ("Stages, once per sweep and cached: " + (f"the SFT reference trained in {sft:.0f} s; " if sft else "")
              + (f"the reward model (the reference with a scalar head, Bradley-Terry on the {learned['pairs']} "
                 f"training pairs) in {learned['train_seconds']:.0f} s, preferring the chosen completion of "
                 f"{learned['heldout_accuracy']:.0%} of held-out pairs"
                 + ("" if pd.isna(learned["gold_agreement"]) else
                    f", its scores ranking held-out completions as the gold reward does with Spearman's ρ = "
                    f"{learned['gold_agreement']:.2f}") + ". " if learned else ""))  # fmt: skip
    text = (
        "Offline losses against the methods they are compared with, trained from the same reference with the same "
        "optimizer, learning rate, steps and prompts: online preference training (two samples of the policy per "
        "prompt each step, labelled by the learned reward model), RLOO and PPO against the learned reward with β as "
        "the KL coefficient, and best-of-N sampling from the reference (no training; its KL is the analytic "
        "log N − (N−1)/N). samples_drawn: completions each cell sampled (an online or RL step samples as many as "
        "an offline step trains on; offline losses sample none, training on the pairs drawn once for every cell). "
        "train_seconds and eval_seconds: wall time per cell, training and its final evaluation. gold_reward_sd: the "
        "spread over seeds; spikes: steps per cell whose loss lies beyond Q3 + 3·IQR of the cell's own. models: "
        "what a cell holds while it trains. proxy_reward: the learned reward model's score of the evaluation "
        "samples; a method that climbs it without climbing the gold reward is over-optimising. "
        + stages
        + _dpo_against_ppo(table)
    )
    figure = figures.rlhf(table, tidy, colors, reference_gold, scenario)
    return Section("rlhf", "DPO vs RLHF", text, figures=[figure], tables=[("DPO vs RLHF", table)])


def _dpo_against_ppo(table: pd.DataFrame) -> str:
    """The DPO paper's finding (DPO at least as good as PPO), checked at each β where both ran: which is ahead, or
    that the 95% intervals overlap."""
    dpo, ppo = table[table.variant == "dpo"], table[table.variant == "ppo"]
    found = []
    for beta in sorted(set(dpo.beta) & set(ppo.beta)):
        d, q = dpo[dpo.beta == beta].iloc[0], ppo[ppo.beta == beta].iloc[0]
        gap, reach = d.gold_reward - q.gold_reward, d.gold_reward_ci + q.gold_reward_ci
        if pd.isna(reach) or abs(gap) <= reach:
            outcome = "not told apart (the 95% intervals overlap)"
        else:
            outcome = f"{'DPO' if gap > 0 else 'PPO'} ahead by {abs(gap):.3f}, beyond both intervals"
        found.append(f"at β = {beta:g}, dpo {d.gold_reward:+.3f} ± {d.gold_reward_ci:.3f} (KL {d.kl_to_reference:.2f}) "
                     f"and ppo {q.gold_reward:+.3f} ± {q.gold_reward_ci:.3f} (KL {q.kl_to_reference:.2f}): {outcome}")  # fmt: skip
    if not found:
        return ""
    seeds = int(dpo.seeds.min())
    return ("The DPO paper found DPO's reward at least PPO's. Here, in gold reward over "
            f"{seeds} seed{'s' * (seeds != 1)}: " + "; ".join(found) + ". The frontier shows "
            "the same configurations at their own KL.")  # fmt: skip


def _label_configurations(finals: pd.DataFrame, tidy: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every table and figure of the report keeps a variant's settings apart: ``variant`` becomes its configuration
    label (``dpo[label_smoothing=0.2]``, see ``configuration_labels``) wherever cells of one variant differ in more
    than β and the seed, in the cells and in the per-step frame alike; ``loss_name`` keeps the registered name."""
    labels = configuration_labels(finals).where(~is_reference(finals), finals.variant)
    by_cell = dict(zip(finals.cell_id, labels, strict=True))
    finals = finals.assign(loss_name=finals.variant, variant=labels)
    return finals, tidy.assign(variant=tidy.cell_id.map(by_cell).fillna(tidy.variant))


def _glossary(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """Every metric of the catalogue (every metric column of summary.csv) with its meaning, unit, which way is
    better and how a cell's final value is taken: the summary's columns first, as they stand, then the rest."""
    shown = [m for m in summary.columns if m in METRICS]
    table = glossary_table([*shown, *(m for m in METRICS if m not in shown)])
    entries = []
    for row in table.itertuples(index=False):
        unit = "no unit" if row.unit == "–" else row.unit
        better = "" if row.better == "–" else f"; {row.better} is better"
        final = "the last evaluation's" if row.source == "eval" else "the mean of the last 10% of training steps"
        entries.append((row.metric, f"{row.meaning} ({unit}{better}; {final})"))
    return entries


def _study_sections(finals: pd.DataFrame) -> list[Section]:
    """A section for each variant whose registration declares a parameter study (``LossSpec.study``) and which ran
    two or more of its configurations."""
    from dpobench.plugins import get_losses

    registry = get_losses()
    sections = []
    for name in sorted(set(finals[~is_reference(finals)].loss_name)):
        study = registry[name].study if name in registry else None
        figure = figures.parameter_study(finals, name, study) if study is not None else None
        if figure is not None:
            sections.append(Section(f"study-{name}", f"Parameter study: {name}", study.text, figures=[figure]))
    return sections


def _throughput_section(store: str | Path, finals: pd.DataFrame, colors: dict, devices: str,
                        bench: str | Path | None) -> Section:  # fmt: skip
    """What each configuration's training step costs, as measured side by side (``step_cost_table``); the sweep's own
    per-cell throughput only as its range, since cells timed one after another on a shared machine differ by the
    machine's load; CUDA's peak memory per variant; a pytest-benchmark file's kernel timings where given."""
    costs = step_cost_table(store)
    speed = throughput_table(finals)
    memory = speed[["variant", "device", "peak_memory_mb"]] if "peak_memory_mb" in speed else None
    bench_frame = read_benchmark_json(bench) if bench else None
    if len(costs):
        differ = costs[costs.differs != ""]
        text = (f"Step cost, measured side by side after the cells (run {costs.attrs['run_id']}, on {devices}): every "
                f"configuration trained one step on the same batch from the same weights, in {int(costs.rounds.max())} "
                "interleaved rounds; its cost is its step time over the median configuration's in the same round, "
                "so that the machine's load between rounds cancels (x_median, and its least and most over the "
                f"rounds). 'cheaper' or 'dearer' marks a configuration every one of {SIGN_TEST_ROUNDS} or more rounds "
                "puts on the same side (a sign test at 5%): "
                + (f"{len(differ)} of {len(costs)} do. " if len(differ) else "none does: the losses cost the same "
                   "step within what the measurement can tell. "))  # fmt: skip
    else:
        text = ("No side-by-side step cost in this store (a sweep with --step-cost-rounds 0, or from before "
                "dpobench measured it), so no variant is compared on speed here. ")  # fmt: skip
    if len(speed):
        text += (f"During the sweep, cells timed one after another ran at {speed.pairs_per_s.median():.0f} training "
                 f"pairs/s (median over variants; from {speed.pairs_per_s.min():.0f} to {speed.pairs_per_s.max():.0f}): "
                 "that spread is the machine's load while each cell ran, not the losses', and is not shown per "
                 "variant. ")  # fmt: skip
    text += ("Peak memory (MiB) is CUDA's max_memory_allocated per variant; on the CPU there is none, as the process's "
             "peak RSS is inherited from the cells before." if memory is not None else "")  # fmt: skip
    tables = [(name, table) for name, table in (("step cost, side by side", costs if len(costs) else None),
              ("peak memory", memory), ("loss kernels (pytest-benchmark, 1e6 pairs)", bench_frame))
              if table is not None]  # fmt: skip
    drawn = len(costs) or memory is not None or bench_frame is not None
    return Section("throughput", "Step cost and memory", text, tables=tables,
                   figures=[figures.throughput(costs, colors, devices, memory, bench_frame)] if drawn else [])  # fmt: skip


def _geometry_section(finals: pd.DataFrame, colors: dict) -> Section | None:
    from dpobench.landscape import landscape
    from dpobench.plugins import get_losses

    registry = get_losses()
    cells = finals[~is_reference(finals)]
    specs = [registry[v] for v in sorted(set(cells.loss_name)) if v in registry]
    if not specs:
        return None
    # each variant's curve at the β its cells trained with (the most common, where several), as trained
    trained = {name: float(b.mode().iloc[0]) for name, b in cells.groupby("loss_name").beta if b.notna().any()}
    grid = sorted({0.01, 0.03, 0.1, 0.3, 1.0, *trained.values()})
    # the curves over every margin at the trained β only; the β panel reads one margin at every β of the grid
    curves = landscape(specs, betas=sorted(set(trained.values())), margins=tuple(x / 4 for x in range(-40, 41)))
    at_two = landscape(specs, betas=grid, margins=(2.0,))
    frame = pd.concat([curves, at_two]).drop_duplicates(["variant", "beta", "margin"], ignore_index=True)
    frame.attrs["errors"] = {**at_two.attrs.get("errors", {}), **curves.attrs.get("errors", {})}
    failed = "; ".join(f"{name}: {error}" for name, error in frame.attrs.get("errors", {}).items())
    if frame.empty:
        return None
    return Section("geometry", "Model-free geometry", "Loss and gradient weight against the log-ratio margin (each "
                   "variant at the β its cells trained with), and preference probability against β, from each "
                   "variant's formula (`dpobench landscape`)."
                   + (f" Left out because their loss failed: {failed}." if failed else ""),
                   figures=[figures.geometry(frame, colors, family, betas=trained)
                            for family in sorted(set(frame.plugin))])  # fmt: skip


def _svg(fig: Figure) -> str:
    """The figure as an inline SVG, each hover title (``figures.hover_titles``) escaped into its point's group."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "dpobench"}):
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG is inlined
    # Text is drawn as paths; matplotlib repeats each string in an XML comment, which we drop so that
    # no plugin- or config-supplied string reaches the page outside an escaped context.
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for gid, title in figures.hover_titles(fig).items():
        text = re.sub(f'(<g id="{re.escape(gid)}"[^>]*>)', lambda m, t=title: m.group(1) + f"<title>{escape(t)}</title>",
                      text, count=1)  # fmt: skip
    return text


def render_html(report: Report) -> str:
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(_HTML)
    sections = [
        {"id": s.id, "title": s.title, "text": s.text, "lines": s.lines, "figures": [Markup(_svg(f)) for f in s.figures],
         "glossary": s.glossary,
         "tables": [(name, Markup(_fmt_table(t).to_html(index=False, escape=True, border=0, na_rep="–", classes="sortable")))
                    for name, t in s.tables]}
        for s in report.sections
    ]  # fmt: skip
    return template.render(title=report.title, subtitle=report.subtitle, header=report.header, sections=sections,
                           script=Markup(_SORT_SCRIPT))  # fmt: skip


def render_pdf(report: Report, path: Path) -> None:
    """The report as A4 pages: the verdict and its decision table first (one page), then the provenance, then each
    section as the HTML has it."""
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path, metadata={"Title": report.title, "Creator": f"dpobench {dpobench.__version__}"}) as pdf:
        sections = list(report.sections)
        if sections and sections[0].lines:
            pdf.savefig(_verdict_page(report, sections.pop(0)))
        pdf.savefig(_provenance_page(report))
        for section in sections:
            pdf.savefig(_text_page(section.title, section.text))
            for fig in section.figures:
                pdf.savefig(fig)
            for name, table in section.tables:
                for page in _table_pages(f"{section.title}: {name}", _fmt_table(table)):
                    pdf.savefig(page)
            for page in _glossary_pages(f"{section.title}: glossary", section.glossary):
                pdf.savefig(page)


#: rows of the decision table that the PDF's first page holds; the ranked summary that follows has every row
FIRST_PAGE_ROWS = 40


def _verdict_page(report: Report, section: Section) -> Figure:
    """The first page (A4 landscape): title, what was compared, the verdict's lines, its rules, and its decision table
    (the first ``FIRST_PAGE_ROWS`` rows, the rest named)."""
    page = Figure(figsize=(11.69, 8.27))
    page.text(0.04, 0.96, f"{report.title}: {section.title}", fontsize=15, weight="bold", va="top")
    page.text(0.04, 0.915, report.subtitle, fontsize=8, va="top", color="0.3")
    y = 0.885
    for line in section.lines:
        for i, part in enumerate(_wrap(line, 150)):
            page.text(0.04 if i == 0 else 0.055, y, ("• " if i == 0 else "") + part, fontsize=8, va="top")
            y -= 0.02
    for part in _wrap(section.text, 165):
        page.text(0.04, y, part, fontsize=7.5, va="top", color="0.25")
        y -= 0.018
    name, table = section.tables[0]
    shown = _fmt_table(table.head(FIRST_PAGE_ROWS))
    caption = f"{name}" + (f" (first {FIRST_PAGE_ROWS} of {len(table)} rows; the ranked summary has all)"
                           if len(table) > FIRST_PAGE_ROWS else "")  # fmt: skip
    page.text(0.04, y - 0.005, caption, fontsize=8, weight="bold", va="top")
    ax = page.add_axes((0.04, 0.02, 0.92, max(0.1, y - 0.035)))
    ax.axis("off")
    cells = ax.table(cellText=shown.values.tolist(), colLabels=list(shown.columns), loc="upper left", cellLoc="left")
    cells.auto_set_font_size(False)
    cells.set_fontsize(6.5)
    cells.auto_set_column_width(list(range(len(shown.columns))))
    height = (y - 0.035) / (len(shown) + 1)
    for cell in cells.get_celld().values():  # rows as tall as the space allows, up to a comfortable height
        cell.set_height(min(0.035, height / max(0.1, y - 0.035)))
    return page


def _provenance_page(report: Report) -> Figure:
    """The runs, device, versions, plugins and configuration behind the report, and what its numbers are."""
    page = Figure(figsize=(8.27, 11.69))
    page.text(0.08, 0.95, f"{report.title}: provenance", fontsize=16, weight="bold", va="top")
    y = 0.90
    for key, value in report.header:
        for line in _wrap(f"{key}: {value}", 100)[:8]:
            page.text(0.08, y, line, fontsize=8, va="top", family="monospace")
            y -= 0.018
    y -= 0.02
    for line in _wrap(HONESTY, 100):
        page.text(0.08, y, line, fontsize=8, va="top")
        y -= 0.018
    return page


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def _text_page(title: str, text: str) -> Figure:
    """A section's title and text, as the HTML shows them above its figures."""
    page = Figure(figsize=(8.27, 11.69))
    page.text(0.08, 0.95, title, fontsize=16, weight="bold", va="top")
    for i, line in enumerate(_wrap(text, 100)):
        page.text(0.08, 0.90 - 0.018 * i, line, fontsize=8, va="top")
    return page


def _glossary_pages(title: str, entries: list[tuple[str, str]], lines_per_page: int = 48) -> list[Figure]:
    """Glossary entries on A4 pages: each term in bold, its definition wrapped below it, indented."""
    blocks = [[(term, True)] + [(f"    {line}", False) for line in _wrap(text, 96)] for term, text in entries]
    pages: list[list[tuple[str, bool]]] = []
    for block in blocks:
        if not pages or len(pages[-1]) + len(block) > lines_per_page:
            pages.append([])
        pages[-1] += block
    drawn = []
    for lines in pages:
        page = Figure(figsize=(8.27, 11.69))
        page.text(0.08, 0.95, title, fontsize=12, weight="bold", va="top")
        for i, (line, bold) in enumerate(lines):
            page.text(0.08, 0.91 - 0.0175 * i, line, fontsize=8, va="top", weight="bold" if bold else "normal")
        drawn.append(page)
    return drawn


#: the columns that name a row, repeated on every page of a table too wide for one
_ROW_NAMES = ("rank", "variant", "configuration", "beta", "scenario")


def _table_pages(title: str, table: pd.DataFrame, rows_per_page: int = 36, columns_per_page: int = 12,
                 cell_chars: int = 28, long_chars: int = 110) -> list[Figure]:  # fmt: skip
    """A table on A4 landscape pages: every column, in groups of ``columns_per_page`` with the row-naming columns
    repeated in each group, each column as wide as its text. A column with cells longer than ``cell_chars`` (a
    configuration's parameters) gets a group of its own, where its cells keep up to ``long_chars``; longer cells are
    cut with "…"."""
    names = [c for c in table.columns if c in _ROW_NAMES]
    rest = [c for c in table.columns if c not in _ROW_NAMES]
    long = [c for c in rest if table[c].astype(str).str.len().max() > cell_chars]
    short = [c for c in rest if c not in long]
    width = max(1, columns_per_page - len(names))
    groups = [(names + short[i : i + width], cell_chars) for i in range(0, len(short), width)]
    groups += [([*names, c], long_chars) for c in long]
    groups = groups or [(names, cell_chars)]
    cut = lambda text, n: text if len(text) <= n else text[: n - 1] + "…"  # noqa: E731
    pages = []
    for number, (columns, chars) in enumerate(groups, 1):
        part_of = f", columns {number} of {len(groups)}" if len(groups) > 1 else ""
        for start in range(0, max(1, len(table)), rows_per_page):
            part = table.iloc[start : start + rows_per_page][columns].astype(str)
            fig = Figure(figsize=(11.69, 8.27))
            fig.suptitle(f"{title} (rows {start + 1}–{start + len(part)} of {len(table)}{part_of})", fontsize=10)
            ax = fig.add_axes((0.03, 0.03, 0.94, 0.88))
            ax.axis("off")
            if len(part):
                cell_table = ax.table(cellText=[[cut(c, chars) for c in row] for row in part.values.tolist()],
                                      colLabels=[cut(str(c), 20) for c in columns], loc="upper center", cellLoc="left")  # fmt: skip
                cell_table.auto_set_font_size(False)
                cell_table.set_fontsize(6.5)
                cell_table.auto_set_column_width(list(range(len(columns))))
                cell_table.scale(1, 1.15)
            pages.append(fig)
    return pages


def write_report(store: str | Path, out_dir: str | Path, formats: tuple[str, ...] = ("html", "pdf"),
                 metric: str | None = None, bench: str | Path | None = None) -> list[Path]:  # fmt: skip
    """Build the report and write ``report.html`` / ``report.pdf`` atomically (write, then rename)."""
    report = build_report(store, metric, bench)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in ("html", "pdf"):
            raise ValueError(f"--format {fmt!r}: use html and/or pdf")
        path = out / f"report.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "html":
                tmp.write_text(render_html(report), encoding="utf-8")
                for figure in (f for section in report.sections for f in section.figures):
                    figure.set_layout_engine("none")  # laid out by that drawing: the PDF's skips it (3.0 s → 1.8 s)
            else:
                render_pdf(report, tmp)
        written.append(path)
    return written


#: sorts a table by the column whose heading is clicked (again: the other way); numbers as numbers, "–" last.
#: Written here, not fetched: the report opens offline.
_SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((head, column) => head.addEventListener("click", () => {
    const up = head.dataset.order !== "ascending";
    heads.forEach(h => delete h.dataset.order);
    head.dataset.order = up ? "ascending" : "descending";
    const value = row => {
      const text = row.cells[column].textContent.trim().replace("\u2212", "-");
      const number = Number(text.split(/[ \u00b1]/)[0].replace(/%$/, ""));
      return text === "\u2013" || text === "" ? null : (Number.isNaN(number) ? text : number);
    };
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = value(a), y = value(b);
      if (x === null || y === null) return (x === null) - (y === null);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return up ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  }));
}
"""

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.1em; } p.subtitle { margin-top: 0; color: #555; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; cursor: pointer; } td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
th[data-order=ascending]::after { content: " \\25B2"; } th[data-order=descending]::after { content: " \\25BC"; }
details.header summary { cursor: pointer; color: #555; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: 2px 1em; font-size: 12px; }
dl.header dt { font-weight: bold; } dl.header dd { margin: 0; word-break: break-all; }
ul.lines { padding-left: 1.2em; } ul.lines li { margin: 0.2em 0; } p.rules { font-size: 12px; color: #444; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
.table-wrap { overflow-x: auto; } nav li { display: inline; margin-right: 1em; }
dl.glossary { font-size: 12px; } dl.glossary dt { font-weight: bold; } dl.glossary dd { margin: 0 0 0.4em 2em; }
</style></head>
<body>
<h1>{{ title }}</h1>
<p class="subtitle">{{ subtitle }}</p>
<details class="header"><summary>Provenance: runs, device, versions, plugins, configuration</summary>
<dl class="header">{% for key, value in header %}<dt>{{ key }}</dt><dd>{{ value }}</dd>{% endfor %}</dl></details>
<nav><ul>{% for s in sections %}<li><a href="#{{ s.id }}">{{ s.title }}</a></li>{% endfor %}</ul></nav>
{% for s in sections %}<section id="{{ s.id }}"><h2>{{ s.title }}</h2>
{% if s.lines %}<ul class="lines">{% for line in s.lines %}<li>{{ line }}</li>{% endfor %}</ul>
<p class="rules">{{ s.text }}</p>{% else %}<p>{{ s.text }}</p>{% endif %}
{% for svg in s.figures %}<figure>{{ svg }}</figure>
{% endfor %}{% for name, table in s.tables %}<h3>{{ name }}</h3><div class="table-wrap">{{ table }}</div>
{% endfor %}{% if s.glossary %}<h3>glossary</h3><dl class="glossary">{% for term, text in s.glossary %}<dt>{{ term }}</dt>
<dd>{{ text }}</dd>{% endfor %}</dl>
{% endif %}</section>
{% endfor %}<script>{{ script }}</script>
</body></html>
"""
