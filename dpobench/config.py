"""A sweep's configuration: every option and its default, written once; presets, a TOML file and the command line
merged in that order; everything checked before any work starts.

The command line is a thin shell over ``load_config``: its options carry these names, and its help text reads the
defaults from here.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dpobench.acceleration import SpeedOptions, check_speed
from dpobench.data import SCENARIOS, DataRecipe, desirable_ratio
from dpobench.models import PRETRAINED, SFTRecipe
from dpobench.registry import Registry

__all__ = [
    "DEFAULT_PRESET",
    "EXECUTORS",
    "OPTIONS",
    "PRESETS",
    "ExecutorOptions",
    "LoraOptions",
    "SweepConfig",
    "SweepError",
    "TrainConfig",
    "check_config",
    "distinct_variants",
    "load_config",
    "option_default",
    "read_config_file",
    "resolve_device",
    "select_variants",
]


class SweepError(ValueError):
    """A sweep that cannot start as configured; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe every cell shares: only the loss differs between cells."""

    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    #: batches formed from pairs of similar length, to cut padding: pairs are sorted by length within windows of
    #: this many batches of the seeded order, and the window's batches shuffled. 0: plain random batches.
    length_buckets: int = 16


@dataclass(frozen=True)
class ExecutorOptions:
    """Where the cells run. None of it is part of a cell's identity: a cell trained on a Ray worker is the cell
    trained in this process."""

    name: str = "process"  # "process": one cell after another here; "ray": each cell a Ray task
    ray_address: str | None = None  # None: start a local Ray; "auto" or HOST:PORT: join a running cluster
    threads_per_cell: int = 1  # CPU threads (Ray CPUs) each Ray task asks for and torch uses
    cells_per_gpu: int = 1  # on CUDA, Ray tasks sharing one GPU (each asks for 1/N of it)
    #: "process" on the CPU: cells trained side by side, each in a worker process on one thread
    #: (``cells.cells_at_once``); 0: auto
    parallel_cells: int = 0


#: the executors ``--executor`` names
EXECUTORS = ("process", "ray")


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters on the policy (``dpobench.lora``, through peft): only the adapters train, and the reference is
    the base model. Off by default: every weight trains. Part of a cell's identity when on."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    #: module names the adapters go on; "all-linear": every linear layer but the output head (peft's convention)
    targets: tuple[str, ...] = ("all-linear",)

    def label(self) -> str:
        """The settings as a cell's configuration records them (and a report's label shows them)."""
        return f"rank={self.rank}, alpha={self.alpha:g}, targets={','.join(self.targets)}"


@dataclass(frozen=True)
class SweepConfig:
    variants: tuple[str, ...] = ()  # empty: every registered variant carrying every one of ``tags``
    tags: tuple[str, ...] = ()
    betas: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] = (0,)
    scenarios: tuple[str, ...] = ("clean",)
    model: str = "tiny"  # a size name (dpobench builds and SFTs it) or a folder / Hub id
    data: str | None = None  # a JSONL / CSV / Parquet file or a datasets folder of pairs instead of the synthetic task
    split: str = "train"  # the split of a datasets folder that holds several
    #: "vader" or a reward-model folder (``dpobench.judges``) scores the samples as the gold reward; without --data it
    #: also labels the task's pairs (the model's own samples of the task's prompts) in place of the grammar's lexicon
    judge: str | None = None
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    noise: float = 0.2
    length_bonus: float = 0.03
    sft: SFTRecipe | None = None  # overrides the size's default SFT recipe (tests use short ones)
    #: per-variant parameter grids, {"seed_custom_dpo": {"length_normalization": (False, True)}}
    params: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    data_recipe: DataRecipe = field(default_factory=DataRecipe)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    #: rounds of the side-by-side step-cost measurement after the cells (``dpobench.stepcost``); 0: none
    step_cost_rounds: int = 7
    lora: LoraOptions = field(default_factory=LoraOptions)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: named starting points; a TOML file and the command line override them
PRESETS: dict[str, dict[str, Any]] = {
    # the configuration's defaults: every registered variant that trains a loss of its own (distinct_variants)
    "quick": {},
    # the variants their plugins tag "main", 5 β × 3 seeds × every scenario
    "standard": {"tags": ("main",), "betas": (0.01, 0.05, 0.1, 0.5, 1.0), "seeds": (0, 1, 2), "scenarios": SCENARIOS,
                 "steps": 200},
    # the seed's "DPO vs RLHF", measured: offline losses against the methods of dpobench.methods, on one learned
    # reward model, 3 β × 3 seeds; online DPO labelled by the reward model and, as its upper bound, by the gold
    # reward; best-of-N at 1, 4, 16 and 64 samples traces its own reward-KL curve
    "rlhf": {"variants": ("dpo", "ipo", "simpo", "online_dpo", "rloo", "ppo", "best_of_n"), "betas": (0.05, 0.1, 0.5),
             "seeds": (0, 1, 2), "params": {"best_of_n": {"n": (1, 4, 16, 64)},
                                            "online_dpo": {"labeller": ("reward_model", "gold")}}},
}  # fmt: skip
DEFAULT_PRESET = "quick"


def _names(value: object, key: str) -> tuple[str, ...]:
    return tuple(_list(value, str, key))


def _floats(value: object, key: str) -> tuple[float, ...]:
    return tuple(_list(value, float, key))


def _ints(value: object, key: str) -> tuple[int, ...]:
    return tuple(_list(value, int, key))


def _integer(minimum: int) -> Callable[[object, str], int]:
    return lambda value, key: int(_number(value, key, int, minimum))


def _real(value: object, key: str) -> float:
    return float(_number(value, key, float, -math.inf))  # lr's range is check_config's


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"{key} = {value!r}: expected true or false")
    return value


def _text(value: object, key: str) -> str:
    return str(value)


def _executor(value: object, key: str) -> str:
    if value not in EXECUTORS:
        raise SweepError(f"{key} = {value!r}: use one of {', '.join(EXECUTORS)}")
    return str(value)


def _parallel_cells(value: object, key: str) -> int:
    """``auto`` (0) or a count ≥ 1."""
    return 0 if value in ("auto", 0) else int(_number(value, key, int, 1))


def _labels(value: object, key: str) -> str:
    if value not in ("hard", "bt"):
        raise SweepError(f"{key} = {value!r}: use one of hard, bt")
    return str(value)


@dataclass(frozen=True)
class Option:
    """One option of ``dpobench run`` and of a TOML file: how its value is read, and where in ``SweepConfig`` it
    goes (a field, or ``group.field``)."""

    parse: Callable[[object, str], Any]
    target: str

    def default(self) -> Any:
        group, _, name = self.target.rpartition(".")
        holder = getattr(SweepConfig(), group) if group else SweepConfig()
        return getattr(holder, name)


#: every option a sweep takes, by the name the command line (``--batch-size``) and a TOML file (``batch_size``) use
OPTIONS: dict[str, Option] = {
    "variants": Option(_names, "variants"),
    "betas": Option(_floats, "betas"),
    "seeds": Option(_ints, "seeds"),
    "scenarios": Option(_names, "scenarios"),
    "steps": Option(_integer(1), "train.steps"),
    "batch_size": Option(_integer(1), "train.batch_size"),
    "lr": Option(_real, "train.lr"),
    "eval_every": Option(_integer(0), "train.eval_every"),
    "length_buckets": Option(_integer(0), "train.length_buckets"),
    "model": Option(_text, "model"),
    "data": Option(lambda value, key: str(value) if value else None, "data"),
    "split": Option(_text, "split"),
    "judge": Option(lambda value, key: str(value) if value else None, "judge"),
    "device": Option(_text, "device"),
    "labels": Option(_labels, "data_recipe.labels"),
    "train_prompts": Option(_integer(2), "data_recipe.train_prompts"),
    "heldout_prompts": Option(_integer(1), "data_recipe.heldout_prompts"),
    "eval_prompts": Option(_integer(2), "data_recipe.eval_prompts"),
    "chat_prompts": Option(_flag, "data_recipe.chat"),
    "compile": Option(_flag, "speed.compile"),
    "cuda_graphs": Option(_flag, "speed.cuda_graphs"),
    "share_prompt": Option(_flag, "speed.share_prompt"),
    "executor": Option(_executor, "executor.name"),
    "ray_address": Option(lambda value, key: str(value) if value else None, "executor.ray_address"),
    "threads_per_cell": Option(_integer(1), "executor.threads_per_cell"),
    "cells_per_gpu": Option(_integer(1), "executor.cells_per_gpu"),
    "parallel_cells": Option(_parallel_cells, "executor.parallel_cells"),
    "step_cost_rounds": Option(_integer(0), "step_cost_rounds"),
    "lora": Option(_flag, "lora.enabled"),
    "lora_rank": Option(_integer(1), "lora.rank"),
    "lora_alpha": Option(_real, "lora.alpha"),
    "lora_targets": Option(_names, "lora.targets"),
}
#: keys a TOML file may hold besides the options: the preset it starts from and its parameter grids
FILE_KEYS = frozenset(OPTIONS) | {"preset", "params"}


def load_config(
    given: Mapping[str, object] | None = None, *, file: Path | None = None, param: Iterable[str] = (),
    note: Callable[[str], None] = lambda message: None,
) -> SweepConfig:  # fmt: skip
    """The configuration of a sweep: the preset (``given`` or the file's ``preset``, else ``quick``), then the TOML
    ``file``, then ``given`` (the command line: None means not given), then the ``param`` grids
    (``VARIANT.KEY=V1,V2``). ``note`` hears what was left out on purpose. Raises ``SweepError``, one line."""
    settings: dict[str, object] = read_config_file(file) if file is not None else {}
    settings.update({k: v for k, v in (given or {}).items() if v is not None})
    preset = str(settings.pop("preset", DEFAULT_PRESET))
    if preset not in PRESETS:
        raise SweepError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    preset_values = dict(PRESETS[preset])
    preset_grids = {variant: dict(grid) for variant, grid in preset_values.pop("params", {}).items()}
    own = _file_grids(settings.pop("params", {}))
    if (given or {}).get("variants") is not None:  # --variants narrows a file: its grids of variants left out go
        named = set(_names(given["variants"], "variants"))  # type: ignore[index]
        for variant in [v for v in own if v not in named]:
            note(f"--config: [params.{variant}] left out: {variant} is not in --variants")
            del own[variant]
    grids = preset_grids
    for variant, grid in own.items():
        grids.setdefault(variant, {}).update(grid)
    for item in param:
        target, _, values = item.partition("=")
        variant, _, key = target.partition(".")
        if not (variant and key and values):
            raise SweepError(f"--param {item!r}: write VARIANT.KEY=V1,V2, e.g. seed_custom_dpo.temperature=0.5,1")
        grids.setdefault(variant, {})[key] = tuple(v.strip() for v in values.split(","))
        own.setdefault(variant, {})  # the user's own grid: never dropped with the preset's
    chosen = {**preset_values, **settings}
    variants = chosen.get("variants")
    if isinstance(variants, (str, list, tuple)) and not str(variants).strip(" ,[]()'\""):
        raise SweepError(f"variants = {variants!r}: names no variant; leave it out to run every variant")
    if "variants" in settings:  # named variants replace the preset's selection by tag, and its grids of the others
        chosen.pop("tags", None)
        named = set(_names(settings["variants"], "variants"))
        for variant in [v for v in preset_grids if v not in named and v not in own]:
            del grids[variant]
    top: dict[str, Any] = {"params": grids}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in chosen.items():
        if key == "tags":
            top["tags"] = tuple(value)  # type: ignore[arg-type]
            continue
        group, _, name = OPTIONS[key].target.rpartition(".")
        (groups.setdefault(group, {}) if group else top)[name] = OPTIONS[key].parse(value, key)
    base = SweepConfig()
    return replace(base, **top, **{g: replace(getattr(base, g), **values) for g, values in groups.items()})


def read_config_file(path: Path) -> dict[str, object]:
    """A TOML file's settings (``batch-size`` and ``batch_size`` alike); unknown keys refused."""
    try:
        values = tomllib.loads(path.read_text())
    except OSError as error:
        raise SweepError(f"--config {str(path)!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"--config {str(path)!r}: not valid TOML ({error})") from None
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - FILE_KEYS)
    if unknown:
        raise SweepError(
            f"--config {str(path)!r}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(FILE_KEYS))}"
        )
    return values


def _file_grids(params: object) -> dict[str, dict[str, tuple[Any, ...]]]:
    """A TOML file's ``[params.VARIANT]`` tables, ``KEY = [values]`` (or one value)."""
    if not isinstance(params, dict):
        raise SweepError("--config: params must be a table, [params.VARIANT] with KEY = [values]; "
                         "on the command line, --param VARIANT.KEY=V1,V2")  # fmt: skip
    grids = {}
    for variant, values in params.items():
        if not isinstance(values, dict):
            raise SweepError(f"--config: params.{variant} must be a table of key = [values]")
        grids[variant] = {k: tuple(v if isinstance(v, list) else [v]) for k, v in values.items()}
    return grids


def _list(value: object, kind: type, key: str) -> list[Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (str, list, tuple)):
        raise SweepError(f"{key} = {value!r}: expected a list or comma-separated {kind.__name__} values")
    items = value.split(",") if isinstance(value, str) else list(value)
    if any(isinstance(v, bool) for v in items):
        raise SweepError(f"{key} = {value!r}: expected comma-separated {kind.__name__} values")
    if kind is int and any(isinstance(v, float) and not v.is_integer() for v in items):  # int(0.5) would be 0
        raise SweepError(f"{key} = {value!r}: expected comma-separated int values")
    try:
        parsed = [kind(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        raise SweepError(f"{key} = {value!r}: expected comma-separated {kind.__name__} values") from None
    if isinstance(value, str) and value.strip() and not parsed:  # "," names nothing: not "all"
        raise SweepError(f"{key} = {value!r}: names no {kind.__name__} value")
    return parsed


def _number(value: object, key: str, kind: type, minimum: float) -> float:
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise SweepError(f"{key} = {value!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if number < minimum:
        raise SweepError(f"{key} = {value!r}: must be ≥ {minimum:g}")
    return number


def resolve_device(requested: str) -> str:
    """``--device`` made definite: ``auto`` is CUDA where PyTorch sees a GPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SweepError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise SweepError(f"--device {requested!r}: use auto, cpu or cuda")
    return requested


def select_variants(config: SweepConfig, registry: Registry) -> list[str]:
    """The variants a sweep trains: those named, else every variant with the config's tags that trains a loss of
    its own (``distinct_variants``). An unknown name raises the registry's error, with a did-you-mean."""
    if config.variants:
        return [registry[name].name for name in config.variants]  # unknown names fail here, before any training
    return [n for n in distinct_variants(registry) if set(config.tags) <= registry[n].tags]


def distinct_variants(registry: Registry) -> list[str]:
    """Every variant, less those that would train the very same loss as a named preset of the same class at their
    defaults: the generic ``combined`` (DPO + SFT by default) is RPO, which ``rpo`` names. "All variants" then
    trains each loss once; a variant named in ``--variants`` always trains."""

    def identity(spec: Any) -> tuple[type, str]:
        return spec.cls, repr(sorted((k, p.default) for k, p in spec.params.items()))

    presets = {identity(spec) for spec in registry.values() if spec.preset_of is not None}
    return [name for name, spec in registry.items() if spec.preset_of is not None or identity(spec) not in presets]


def check_config(config: SweepConfig, names: list[str], device: str) -> None:
    """Everything about a sweep's settings that can be checked without a model or data (``device``: definite)."""
    for scenario in config.scenarios:
        if scenario not in SCENARIOS and not desirable_ratio(scenario):
            raise SweepError(f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIOS)}, or unpaired-D:U "
                             "(unpaired-1:10: a desirable example for every 10 undesirable ones)")  # fmt: skip
    for beta in config.betas:
        if not beta > 0:
            raise SweepError(f"β = {beta}: every β must be > 0")
    for seed in config.seeds:
        if seed < 0:  # torch would take it; tools that read -1 as "random" would not have fixed it
            raise SweepError(f"seed {seed}: seeds must be ≥ 0 (each is one fixed seed; none means random)")
    if not config.train.lr > 0:
        raise SweepError(f"lr = {config.train.lr:g}: must be > 0 (at 0 every cell would stay the reference model)")
    for variant in config.params:
        if variant not in names:
            close = difflib.get_close_matches(variant, names, n=1)
            fix = f"did you mean {close[0]!r}?" if close else "add it to --variants"
            raise SweepError(
                f"--param {variant}.KEY (or the config's [params.{variant}]): {variant!r} is not among the variants "
                f"of this sweep; {fix}"
            )
    if config.data and config.data_recipe.labels != DataRecipe().labels:
        raise SweepError(
            f"--labels {config.data_recipe.labels}: labels the synthetic task's pairs; drop it with --data"
        )
    if config.data and config.data_recipe.chat:
        raise SweepError("--chat-prompts puts the task's prompts in the model's chat template; --data's rows are the "
                         "file's (conversational rows go through the chat template already): drop it")  # fmt: skip
    for key in ("train_prompts", "heldout_prompts", "eval_prompts"):
        if config.data and getattr(config.data_recipe, key) != getattr(DataRecipe(), key):
            raise SweepError(f"--{key.replace('_', '-')} {getattr(config.data_recipe, key)}: sizes the pairs dpobench "
                             "samples (the synthetic task's, or a judge's); --data's pairs are the file's: drop it")  # fmt: skip
    if not config.data and not config.judge and (config.model in PRETRAINED or config.model.endswith(".gguf")):
        raise SweepError(f"--model {config.model}: a pretrained model does not know the synthetic task's grammar (only "
                         "the sizes tiny, small and base are trained on it); give your pairs with --data pairs.jsonl, "
                         "or a judge to label its own samples with --judge vader")  # fmt: skip
    if config.split != SweepConfig.split and not (config.data and Path(config.data).is_dir()):
        raise SweepError(f"--split {config.split}: picks a split of a dataset folder (--data FOLDER written by "
                         "save_to_disk); a file of pairs has none, and neither has the synthetic task")  # fmt: skip
    if config.data and {s for s in config.scenarios if not desirable_ratio(s)} - {"clean"}:
        raise SweepError(
            "--scenarios noisy/length-biased need the synthetic task's gold labels; drop --data or use clean"
        )
    try:
        check_speed(config.speed, device, config.speed.compile)
    except ValueError as error:
        raise SweepError(str(error)) from None
    check_executor(config.executor)
    if config.executor.parallel_cells > 1 and (device != "cpu" or config.speed.compile):
        why = "--compile is on" if device == "cpu" else f"this sweep runs on {device}"
        raise SweepError(f"--parallel-cells {config.executor.parallel_cells}: cells train side by side only on the "
                         f"CPU and eagerly ({why}); use --parallel-cells 1, or --executor ray --cells-per-gpu N on a "
                         "GPU")  # fmt: skip
    check_lora(config.lora)


def check_lora(options: LoraOptions) -> None:
    """LoRA's settings, and peft installed where LoRA is asked for (whether the model has the target modules is
    known once it is loaded: ``dpobench.lora.add_adapters`` says)."""
    if not options.enabled:
        _only_with({"lora_rank": options.rank != LoraOptions.rank, "lora_alpha": options.alpha != LoraOptions.alpha,
                    "lora_targets": options.targets != LoraOptions.targets}, "sets up LoRA", "--lora (lora = true)")  # fmt: skip
        return
    if importlib.util.find_spec("peft") is None:
        raise SweepError("--lora: peft is not installed; pip install 'dpobench[real]'")
    if not options.alpha > 0:
        raise SweepError(f"--lora-alpha {options.alpha:g}: must be > 0 (the adapters' scale is alpha / rank)")
    if not options.targets:
        raise SweepError(
            "--lora-targets: names no module; leave it out for all-linear, or name modules (q_proj,v_proj)"
        )


def _only_with(given: dict[str, bool], needs: str, add: str) -> None:
    """Refuse the first option of ``given`` that was set (True) without what it ``needs``: one line that says to
    ``add`` it, or drop the option."""
    for key, was_set in given.items():
        if was_set:
            flag = key.replace("_", "-")
            raise SweepError(f"--{flag} (or {key} in a config file) {needs}; add {add}, or drop --{flag}")


def check_executor(options: ExecutorOptions) -> None:
    """The executor's settings, Ray installed where it is asked for, and a cluster address that answers."""
    if options.name != "ray":
        ray_only = {"ray_address": options.ray_address is not None, "threads_per_cell": options.threads_per_cell != 1,
                    "cells_per_gpu": options.cells_per_gpu != 1}  # fmt: skip
        _only_with(ray_only, 'needs --executor ray (executor = "ray")', "that")
        return
    if options.parallel_cells:
        raise SweepError(
            f"--parallel-cells {options.parallel_cells}: trains cells side by side in this process; "
            "with --executor ray each cell is a task (--threads-per-cell sets its threads): drop one"
        )
    if importlib.util.find_spec("ray") is None:
        raise SweepError("--executor ray: Ray is not installed; pip install 'dpobench[ray]'")
    if options.ray_address not in (None, "auto"):
        _check_reachable(options.ray_address)


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers at fails here in seconds: Ray itself retries for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--ray-address {address!r}: write HOST:PORT (what `ray start --head` prints) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise SweepError(
            f"--ray-address {address}: nothing answers there ({error.strerror or error}); start the cluster with "
            "`ray start --head`, or leave out --ray-address for a local Ray"
        ) from None


def option_default(name: str) -> Any:
    """The default of option ``name`` as the command line's help shows it."""
    return OPTIONS[name].default()
