"""The metric catalogue: every number a cell records, once, with its unit, which way is better, its format and a
one-line meaning. The store accepts exactly these metrics; the tidy frame, the finals (``summary.csv``), the terminal
table, the report's tables, glossary and figure labels all read them from here.

Adding a metric is one ``Metric`` below plus the code that measures it (the trainer's step or the evaluator returns
it under its name). It is then stored, read, reduced to each cell's final value, written to ``summary.csv``, offered
to ``--metric`` (when it has a direction) and defined in the report's glossary; ``SUMMARY`` and ``TERMINAL`` choose
the metrics those two tables show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "METHOD_METRICS",
    "METRICS",
    "RANK_BY",
    "SUMMARY",
    "TERMINAL",
    "TIMINGS",
    "Metric",
    "by_source",
    "rankable",
    "register",
]


@dataclass(frozen=True)
class Metric:
    """One metric. ``source``: measured at every training step (``"step"``; a cell's final value is the mean over
    its last 10% of steps) or at each evaluation (``"eval"``; its final value is the last evaluation's)."""

    name: str
    source: Literal["step", "eval"]
    #: what it is, in words, as a figure's axis says it
    label: str
    #: its unit, as a table or axis names it ("" for a pure number)
    unit: str
    #: which way is better: "higher", "lower", or None for a quantity that is neither (it cannot rank)
    better: Literal["higher", "lower"] | None
    #: how the terminal table formats it (a format spec)
    fmt: str
    #: one line for the glossary: what is measured, and how
    doc: str
    #: the terminal table's column header
    short: str = ""
    #: a step metric that is work per time: its final value is the window's total work over its total time (Σ work /
    #: Σ seconds, each step's rate × its step_time_ms), not the mean of per-step rates that one fast step dominates
    rate: bool = False
    #: the metric holding this one's standard error per cell, which gives a one-seed configuration its interval
    se: str | None = None
    #: the evaluator's key carrying this metric per evaluation prompt (a list in the prompts' order): the store keeps
    #: them, and the report ranks one-seed configurations by their paired differences
    per_prompt: str | None = None
    #: measured only with the synthetic task's gold reward model and grammar (pairs from ``--data`` have neither)
    needs_gold: bool = False

    @property
    def higher_is_better(self) -> bool:
        return self.better != "lower"

    @property
    def axis(self) -> str:
        """The axis label: what it is, and its unit."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def header(self) -> str:
        return self.short or self.name


_CATALOGUE = [
    # evaluation: samples of the policy on held-out prompts, and held-out preference pairs
    Metric("gold_reward", "eval", "gold reward of samples", "−1…1", "higher", "+.3f",
           "the synthetic task's true reward of one sampled completion per evaluation prompt, averaged (each in [−1, 1])",
           short="gold", se="gold_reward_se", per_prompt="gold_samples", needs_gold=True),
    Metric("gold_reward_se", "eval", "standard error of the gold reward", "−1…1", None, ".3f",
           "the gold reward's standard error over its evaluation prompts (s / √n)", needs_gold=True),
    Metric("kl_to_reference", "eval", "KL(π‖π_ref)", "nats", "lower", ".2f",
           "the KL from the SFT reference, estimated on the same samples (mean of log π − log π_ref), per completion; "
           "lower keeps closer to it", short="KL"),
    Metric("grammatical_fraction", "eval", "grammatical samples", "fraction", "higher", ".2f",
           "the fraction of samples the task's grammar accepts", short="gram", needs_gold=True),
    Metric("repetitive_fraction", "eval", "repetitive samples", "fraction", "lower", ".2f",
           "the fraction of samples that loop: a quarter or more of a sample's word 3-grams repeat an earlier one "
           "of the same sample (seq-rep-3 ≥ 0.25, Welleck et al. 2019); any text, any tokenizer", short="rep"),
    Metric("distinct_2", "eval", "distinct bigrams", "fraction", "higher", ".2f",
           "the unique word bigrams of all the samples over all their bigrams (distinct-2, Li et al. 2016): samples "
           "that say the same things to every prompt lower it", short="dist-2"),
    Metric("response_length", "eval", "response length", "tokens", "lower", ".1f",
           "tokens per sampled completion (EOS excluded)", short="len"),
    Metric("heldout_reward_accuracy", "eval", "held-out implicit reward accuracy", "fraction", "higher", ".2f",
           "how often the policy's implicit reward prefers the chosen response of a held-out pair",
           short="held-out acc"),
    Metric("heldout_reward_margin", "eval", "held-out implicit reward margin", "", None, ".2f",
           "by how much, on average, the implicit reward prefers the chosen response of a held-out pair (the "
           "variant's own scale)"),
    Metric("n_samples", "eval", "evaluation samples", "samples", None, ".0f",
           "how many completions the evaluation sampled (one per evaluation prompt; best-of-N: N per prompt)"),
    Metric("proxy_reward", "eval", "learned reward of samples", "", "higher", "+.3f",
           "the learned reward model's score of the same samples, averaged (RLHF methods: the reward they optimise; "
           "beside the gold reward it shows over-optimisation)", short="proxy"),
    Metric("eval_seconds", "eval", "evaluation time", "s", "lower", ".1f",
           "wall time of one evaluation: sampling, scoring the samples and the held-out pairs (best-of-N: its N "
           "samples per prompt and their learned rewards)"),
    # training: each step's batch; the final value is the mean over the last 10% of steps
    Metric("loss", "step", "loss", "nats", "lower", ".3f",
           "the training loss, on its variant's own scale (it does not compare across variants)"),
    Metric("reward_accuracy", "step", "implicit reward accuracy", "fraction", "higher", ".2f",
           "the fraction of a training batch's pairs whose implicit reward prefers the chosen response (the "
           "variant's own reward)", short="acc"),
    Metric("reward_margin", "step", "implicit reward margin (chosen − rejected)", "", "higher", ".2f",
           "the implicit reward of chosen minus rejected, mean over a training batch (the variant's own scale)",
           short="margin"),
    Metric("chosen_reward", "step", "implicit reward of chosen", "", None, ".3f",
           "the implicit reward of the chosen responses, mean over a training batch"),
    Metric("rejected_reward", "step", "implicit reward of rejected", "", None, ".3f",
           "the implicit reward of the rejected responses, mean over a training batch"),
    Metric("chosen_logp", "step", "log-probability of chosen", "nats", None, ".2f",
           "the policy's log-probability of a chosen completion (summed over its tokens), mean over a training batch"),
    Metric("rejected_logp", "step", "log-probability of rejected", "nats", None, ".2f",
           "the policy's log-probability of a rejected completion (summed over its tokens), mean over a batch"),
    Metric("grad_norm", "step", "gradient norm", "", None, ".3f",
           "the gradient's global L2 norm before clipping"),
    Metric("rollout_reward", "step", "learned reward of the step's samples", "", None, "+.3f",
           "on-policy methods: the learned reward model's score of the completions the step sampled from the policy, "
           "mean (online preference training labelled by it: of the completions it labelled)"),
    Metric("rollout_kl", "step", "KL of the step's samples", "nats", None, ".2f",
           "on-policy methods: log π − log π_ref of the completions the step sampled, mean per completion"),
    Metric("value_loss", "step", "value loss", "", None, ".3f",
           "PPO: the critic's clipped squared error against the returns (its last PPO epoch)"),
    Metric("samples_per_s", "step", "sampling and training throughput", "samples/s", "higher", ".0f",
           "on-policy methods: completions sampled, scored and trained on per second of the whole step",
           short="samples/s", rate=True),
    Metric("pairs_per_s", "step", "training throughput", "pairs/s", "higher", ".0f",
           "training throughput: preference pairs per second (the window's pairs over its time)",
           short="pairs/s", rate=True),
    Metric("tokens_per_s", "step", "training throughput", "tokens/s", "higher", ".0f",
           "training throughput in tokens per second, each pair's prompt counted twice (the window's tokens over its "
           "time)", rate=True),
    Metric("step_time_ms", "step", "step time", "ms", "lower", ".1f",
           "wall-clock time of one training step"),
    Metric("peak_memory_mb", "step", "peak memory", "MiB", "lower", ".0f",
           "CUDA's max_memory_allocated since the cell began; on the CPU the process's peak RSS so far, which a cell "
           "inherits from the cells before it"),
]  # fmt: skip

#: every metric by name, in the glossary's order
METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the catalogue (a name is one metric: a second entry of that name is refused)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is in the catalogue already")
    if metric.source not in ("step", "eval"):
        raise ValueError(f"metric {metric.name!r}: source {metric.source!r}; use 'step' or 'eval'")
    if metric.better not in ("higher", "lower", None):
        raise ValueError(f"metric {metric.name!r}: better {metric.better!r}; use 'higher', 'lower' or None")
    METRICS[metric.name] = metric
    return metric


for _metric in _CATALOGUE:
    register(_metric)

#: measurements of time and memory: they depend on the machine and on what runs beside a cell, so two runs of the
#: same cells agree in everything else, never in these
TIMINGS = ("step_time_ms", "pairs_per_s", "tokens_per_s", "samples_per_s", "peak_memory_mb", "eval_seconds")

#: what only the methods beyond offline losses measure (``dpobench.methods``): a loss's cell has none of them
METHOD_METRICS = ("proxy_reward", "rollout_reward", "rollout_kl", "value_loss", "samples_per_s")

#: the report's ranked summary: its metric columns, in order (each with its ``_ci`` interval beside it)
SUMMARY = ("gold_reward", "kl_to_reference", "reward_accuracy", "reward_margin", "loss", "response_length",
           "grammatical_fraction", "repetitive_fraction", "distinct_2", "heldout_reward_accuracy",
           "pairs_per_s")  # fmt: skip
#: what the report ranks by unless told: the first of these that the cells measured (pairs from ``--data`` have no
#: gold reward)
RANK_BY = ("gold_reward", "heldout_reward_accuracy")
#: the terminal table printed at the end of ``dpobench run``: its metric columns, in order
TERMINAL = ("loss", "reward_margin", "reward_accuracy", "gold_reward", "kl_to_reference", "response_length",
            "grammatical_fraction", "repetitive_fraction", "pairs_per_s")  # fmt: skip


def by_source(source: str) -> list[str]:
    """The names of the catalogue's metrics measured at ``source`` ("step" or "eval"), sorted by name: the order of
    ``summary.csv``'s columns, training's first."""
    return sorted(name for name, m in METRICS.items() if m.source == source)


def rankable() -> list[str]:
    """The metrics that can rank configurations (``--metric``): those with a direction, sorted by name."""
    return sorted(name for name, m in METRICS.items() if m.better is not None)
