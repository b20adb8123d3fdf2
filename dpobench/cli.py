"""The ``dpobench`` command line: run, report, list, plugins, check, landscape; a thin shell over the library."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import dpobench
from dpobench import plugins as plugin_loading
from dpobench._util import atomic_path
from dpobench.acceleration import AUTO_COMPILE_MIN_PARAMETERS, CUDA_GRAPH_MIN_STEPS_PER_WIDTH
from dpobench.config import DEFAULT_PRESET, PRESETS
from dpobench.data import SCENARIOS
from dpobench.losses import ParamError
from dpobench.models import PRETRAINED, SIZES
from dpobench.registry import LossSpec, Registry, UnknownLossError

app = typer.Typer(
    name="dpobench",
    help="Benchmark preference-optimisation losses (DPO and its family) under identical training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

_options: dict[str, object] = {"debug": False}
T = TypeVar("T")


def _wide() -> Console:
    """stdout at least 120 columns wide: piped output is 80, which would break names and paths mid-word."""
    return Console(width=max(out.width, 120))


class CLIError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


@app.callback()
def _main(
    plugins_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--plugins-dir",
            metavar="DIR",
            help="Load loose .py plugin files from this directory (repeatable; also DPOBENCH_PLUGINS_DIR). "
            "Loading a plugin runs its code.",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"dpobench {dpobench.__version__}")
        raise typer.Exit()
    if plugins_dir:
        # Through the environment, so that every part of dpobench (wrappers included) sees the same plugins.
        current = [p for p in os.environ.get("DPOBENCH_PLUGINS_DIR", "").split(os.pathsep) if p]
        added = [str(p) for p in plugins_dir if str(p) not in current]  # a path given twice loads once
        os.environ["DPOBENCH_PLUGINS_DIR"] = os.pathsep.join([*current, *dict.fromkeys(added)])
    _options["debug"] = debug


def _load(extra: list[Path] | None = None) -> plugin_loading.Plugins:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", plugin_loading.PluginWarning)  # printed below, once
            state = plugin_loading.state(extra or [])
    except FileNotFoundError as error:
        raise CLIError(str(error)) from None
    for message in state.errors:
        err.print(f"[bold red]plugin error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    if not any(info.builtin for info in state.info.values()):
        raise CLIError("no built-in variants found: dpobench is not installed; run `pip install -e .` in the checkout")
    return state


@app.command("list")
def list_variants(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show each variant's formula and parameters.")
    ] = False,
) -> None:
    """List every registered loss variant with its plugin, version and paper."""
    state = _load()
    registry = state.registry
    if verbose:
        for spec in registry.values():
            _print_verbose(spec)
    else:
        table = Table(title=f"{len(registry)} loss variants", title_justify="left")
        for column in ("variant", "plugin", "version", "ref-free"):
            table.add_column(column, overflow="fold")
        table.add_column("paper", no_wrap=True)
        for spec in registry.values():
            table.add_row(
                escape(spec.name + (f" ({spec.preset_of} preset)" if spec.preset_of else "")),
                escape(spec.plugin),
                escape(spec.version),
                "yes" if spec.reference_free else "no",
                spec.paper.replace("https://arxiv.org/abs/", "arXiv:"),
            )
        _wide().print(table)  # piped output is 80 wide: names would break mid-word
        _wide().print(_methods_table())
    if state.errors:
        raise typer.Exit(1)


def _methods_table() -> Table:
    """The methods beyond offline losses (``dpobench.methods``), selected with ``--variants`` too."""
    from dpobench.methods import LISTED

    table = Table(title="methods beyond offline losses, selected with --variants too (docs/rlhf.md)",
                  title_justify="left")  # fmt: skip
    for column in ("method", "what it does", "models it holds", "parameters"):
        table.add_column(column, overflow="fold")
    table.add_column("paper", no_wrap=True)
    for name, cls in LISTED.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        models = ", ".join(cls.models) if isinstance(cls.models, tuple) else "policy, reference, reward model"
        table.add_row(escape(name), escape(summary), models, ", ".join(cls.params), cls.paper)
    return table


def _print_verbose(spec: LossSpec) -> None:
    preset = f", preset of {spec.preset_of}" if spec.preset_of else ""
    out.print(f"[bold]{escape(spec.name)}[/]  ({escape(spec.plugin)} {escape(spec.version)}{preset})", highlight=False)
    out.print(f"  {escape(spec.summary)}", highlight=False, soft_wrap=True)
    out.print(f"  reference-free: {'yes' if spec.reference_free else 'no'}", highlight=False)
    out.print(f"  inputs: {escape(', '.join(spec.inputs))}", highlight=False)
    out.print(f"  paper: {escape(spec.paper)}", highlight=False)  # a preset's own, where it has one
    out.print("  formula:", highlight=False)
    for line in spec.formula.splitlines():
        out.print(f"    {escape(line)}", highlight=False, soft_wrap=True)
    out.print("  parameters:", highlight=False)
    for key, param in spec.params.items():
        out.print(
            escape(f"    {key} = {param.default!r}  ({param.describe()}): {param.doc}"), highlight=False, soft_wrap=True
        )
    out.print()


@app.command("plugins")
def list_plugins() -> None:
    """List the loaded plugins, where each came from, and what each registered."""
    state = _load()
    table = Table(title=f"{len(state.info)} plugins", title_justify="left")
    for column in ("plugin", "version", "source", "variants"):
        table.add_column(column, overflow="fold")
    for info in state.info.values():
        names = [s.name for s in state.registry.values() if s.plugin == info.name]
        table.add_row(escape(info.name), escape(info.version), escape(info.source), escape(", ".join(names)))
    _wide().print(table)  # piped output is 80 wide: paths would break mid-word
    if state.errors:
        raise typer.Exit(1)


@app.command("check")
def check(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Variant names or plugin .py files to check (default: every variant)."),
    ] = None,
) -> None:
    """Check variants against the loss contract (shapes, finiteness, gradients, bf16, docstring...)."""
    from dpobench.testing import check_loss

    files = [Path(t) for t in targets or [] if t.endswith(".py") or Path(t).is_file()]
    for file in files:
        if not file.is_file():
            raise CLIError(f"plugin file {str(file)!r} does not exist")
    state = _load(files)
    registry = state.registry
    failed = bool(state.errors)
    specs: list[LossSpec] = []
    for target in targets or list(registry):
        if target.endswith(".py") or Path(target).is_file():
            # the variants of the plugin loaded from this very file: a built-in or another file of the same stem is
            # not it (a file named like a built-in module, dpo.py, is refused with an error, and checks nothing)
            path = Path(target).resolve()
            loaded = {
                i.name for i in state.info.values() if i.source.endswith(".py") and Path(i.source).resolve() == path
            }
            found = [s for s in registry.values() if s.plugin in loaded]
            named = (f"({Path(target).expanduser()})", f"plugin {Path(target).stem!r}")  # the file's error, if any
            if not found and not any(n in e for n in named for e in state.errors):
                raise CLIError(f"plugin file {target!r} registers no variant: call register(...) in register_losses")
            specs += found
        else:
            specs.append(_lookup(registry, target))
    passed = 0
    for spec in specs:
        report = check_loss(spec)
        failed |= not report.ok
        passed += report.ok
        status = "[green]ok[/]" if report.ok else "[bold red]FAIL[/]"
        out.print(
            f"{status}  {escape(spec.name)}  [dim]({escape(spec.plugin)} {escape(spec.version)})[/]", highlight=False
        )
        for result in report.results:
            if not result.ok:
                out.print(f"      ✗ {result.check}: {escape(result.message)}", highlight=False, soft_wrap=True)
    if specs or not state.errors:
        out.print(f"{passed} of {len(specs)} variants pass the loss contract", highlight=False)
    else:  # the file's plugin did not load: its error is above, and there was nothing to check
        err.print("nothing checked: the plugin failed to load (the error above); fix it and rerun", highlight=False)
    if failed:
        raise typer.Exit(1)


def _lookup(registry: Registry, name: str) -> LossSpec:
    try:
        return registry[name]
    except UnknownLossError as error:
        raise CLIError(str(error)) from None


@app.command("landscape")
def landscape_command(
    output: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write.")] = Path("landscape.csv"),
    variants: Annotated[str | None, typer.Option(help="Comma-separated variants (default: all).")] = None,
    betas: Annotated[str | None, typer.Option(help="Comma-separated β values (default: logspace(-2, 0, 15)).")] = None,
    margin_min: Annotated[float, typer.Option(help="Smallest log-ratio margin, nats.")] = -20.0,
    margin_max: Annotated[float, typer.Option(help="Largest log-ratio margin, nats.")] = 20.0,
    points: Annotated[int, typer.Option(help="Number of margins on the grid.", min=2)] = 81,
    tokens: Annotated[int, typer.Option(help="Completion tokens of each response.", min=1)] = 20,
) -> None:
    """Loss, gradient weight and preference probability of every variant over margins × β (tidy CSV)."""
    import numpy as np

    from dpobench.landscape import DEFAULT_BETAS, landscape

    state = _load()
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(state.registry)
    specs = [_lookup(state.registry, n) for n in names]
    beta_grid = DEFAULT_BETAS if betas is None else tuple(_parse_floats(betas, "--betas"))
    if any(b <= 0 for b in beta_grid):
        raise CLIError(f"--betas {betas!r}: every β must be > 0")
    if margin_max <= margin_min:
        raise CLIError(f"--margin-max ({margin_max}) must be larger than --margin-min ({margin_min})")
    margins = tuple(float(m) for m in np.linspace(margin_min, margin_max, points))
    with out.status(f"evaluating {len(specs)} variants × {len(beta_grid)} β × {points} margins"):
        frame = landscape(specs, beta_grid, margins, tokens)
    for name, error in frame.attrs.get("errors", {}).items():
        err.print(f"[bold red]left out:[/] {escape(name)}: {escape(error)}", highlight=False)
    _write_atomic_csv(frame, output)
    written = frame.variant.nunique()
    out.print(f"wrote {len(frame)} rows ({written} variant{'s' * (written != 1)}) to {output}", highlight=False)
    if frame.attrs.get("errors"):  # the others are written; the exit status says some were left out
        raise typer.Exit(1)


def _default(option: str) -> str:
    """An option's default, as its help text shows it (from ``dpobench.config``, where it is written once)."""
    from dpobench.config import option_default

    value = option_default(option)
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


# The options of `dpobench run`, by the names of dpobench.config.OPTIONS; their defaults are the configuration's.
_VariantsOption = Annotated[str | None, typer.Option(help="Comma-separated variants (default: all, or the preset's).")]
_BetasOption = Annotated[str | None, typer.Option(help=f"Comma-separated β values (default {_default('betas')}).")]
_SeedsOption = Annotated[str | None, typer.Option(help=f"Comma-separated seeds (default {_default('seeds')}).")]
_ScenariosOption = Annotated[
    str | None,
    typer.Option(
        help=f"{', '.join(SCENARIOS)}, or unpaired-D:U for unpaired variants (KTO; unpaired-1:10) "
        f"(comma-separated; default {_default('scenarios')})."
    ),
]
_StepsOption = Annotated[
    int | None, typer.Option(help=f"Training steps per cell (default {_default('steps')}).", min=1)
]
_BatchSizeOption = Annotated[
    int | None, typer.Option(help=f"Pairs per step (default {_default('batch_size')}).", min=1)
]
_LrOption = Annotated[float | None, typer.Option(help=f"AdamW learning rate (default {_default('lr')}).")]
_ModelOption = Annotated[
    str | None,
    typer.Option(
        help=f"{', '.join(SIZES)} (trained on the synthetic task), {', '.join(PRETRAINED)} or a .gguf file "
        f"(pretrained; needs --data), or a save_pretrained folder / Hub id (default {_default('model')})."
    ),
]
_DataOption = Annotated[
    Path | None,
    typer.Option(help="Pairs: a JSONL / CSV / Parquet file, a Hugging Face dataset folder (save_to_disk) or a Hub "
                 "dataset's name (ORG/NAME; offline, from the local cache), with prompt, chosen, rejected as text or "
                 "chat messages (or chosen and rejected alone); or unpaired rows of prompt, completion, label.")
]  # fmt: skip
_JudgeOption = Annotated[
    str | None,
    typer.Option(help="What scores the samples as their gold reward: vader (sentiment), or a reward model's "
                 "save_pretrained folder; without --data it also labels the task's pairs, the model's own samples "
                 "(default: none: the task's lexicon, and no gold reward for --data)."),
]  # fmt: skip
_SplitOption = Annotated[
    str | None, typer.Option(help=f"With --data FOLDER: the dataset's split (default {_default('split')}).")
]
_DeviceOption = Annotated[str | None, typer.Option(help=f"auto, cpu or cuda (default {_default('device')}).")]
_EvalEveryOption = Annotated[
    int | None,
    typer.Option(help=f"Evaluate every N steps too (default {_default('eval_every')}: at the end only).", min=0),
]
_LengthBucketsOption = Annotated[
    int | None,
    typer.Option(
        help=f"Batches per length-sorting window (default {_default('length_buckets')}; 0: plain random batches).",
        min=0,
    ),
]
_CompileOption = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile each decoder layer for training (default: on CUDA, for models of "
        f"{AUTO_COMPILE_MIN_PARAMETERS / 1e6:g} M parameters or more).",
    ),
]
_CudaGraphsOption = Annotated[
    bool | None,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Run the compiled layers as CUDA graphs (default: on CUDA where a cell has "
        f"{CUDA_GRAPH_MIN_STEPS_PER_WIDTH}+ steps per batch width).",
    ),
]
_SharePromptOption = Annotated[
    bool | None,
    typer.Option(
        "--share-prompt/--no-share-prompt",
        help="Each pair as one row, its prompt through the model once (default: on the CPU only).",
    ),
]
_PresetOption = Annotated[
    str | None, typer.Option(help=f"{', '.join(PRESETS)} (default {DEFAULT_PRESET}): where the settings start.")
]
_ConfigOption = Annotated[Path | None, typer.Option(help="TOML file with the same keys as these options.")]
_OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output directory (store, CSV); a rerun resumes it.")]
_LabelsOption = Annotated[
    str | None,
    typer.Option(
        help=f"How the synthetic pairs are labelled: hard (higher gold reward wins) or bt (default {_default('labels')})."
    ),
]
_TrainPromptsOption = Annotated[int | None, typer.Option(
    help=f"Prompts whose two samples make the training pairs, without --data (default {_default('train_prompts')}; "
         "ties are dropped).", min=2)]  # fmt: skip
_HeldoutPromptsOption = Annotated[int | None, typer.Option(
    help=f"Prompts of the held-out pairs, without --data (default {_default('heldout_prompts')}).", min=1)]  # fmt: skip
_EvalPromptsOption = Annotated[int | None, typer.Option(
    help=f"Held-out prompts each cell samples one completion of, for its gold reward, KL and health, without --data "
         f"(default {_default('eval_prompts')}; fewer: a faster evaluation, a wider interval).", min=2)]  # fmt: skip
_ChatPromptsOption = Annotated[
    bool | None,
    typer.Option("--chat-prompts/--no-chat-prompts", help="Without --data: each task prompt in the model's chat "
                 "template, the review opening as the start of its answer to a request for a review (instruct "
                 "models; default: off, the bare opening)."),
]  # fmt: skip
_ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="VARIANT.KEY=V1,V2",
        help="A parameter grid (repeatable), e.g. seed_custom_dpo.temperature=0.5,1",
    ),
]
_ReportOption = Annotated[bool, typer.Option(help="Write report.html and report.pdf beside the store.")]
_ExecutorOption = Annotated[
    str | None,
    typer.Option(help=f"Where cells run: process (here: one after another, or side by side on the CPU, see "
                 f"--parallel-cells) or ray (each a Ray task; pip install 'dpobench[ray]'). Default "
                 f"{_default('executor')}."),
]  # fmt: skip
_RayAddressOption = Annotated[
    str | None,
    typer.Option(help="With --executor ray: a running cluster to join (auto, or the HOST:PORT that ray start --head "
                 "prints). Default: start a local Ray on the cores of this machine."),
]  # fmt: skip
_ThreadsPerCellOption = Annotated[
    int | None,
    typer.Option(help=f"With --executor ray: CPU threads each cell asks Ray for and trains with "
                 f"(default {_default('threads_per_cell')}).", min=1),
]  # fmt: skip
_CellsPerGpuOption = Annotated[
    int | None,
    typer.Option(help=f"With --executor ray on CUDA: cells sharing one GPU (default {_default('cells_per_gpu')}).",
                 min=1),
]  # fmt: skip
_ParallelCellsOption = Annotated[
    str | None,
    typer.Option(metavar="N|auto", help="With --executor process on a Linux CPU: cells trained side by side, each in a "
                 "worker process on one thread (auto: one per core where the model has under 1 M trainable "
                 "parameters, whose step cannot use several cores, and cells have 50 steps or more; else 1). "
                 "Default auto."),
]  # fmt: skip
_StepCostRoundsOption = Annotated[
    int | None,
    typer.Option(help=f"Rounds of the side-by-side step-cost measurement after the cells: every configuration on "
                 f"one batch, interleaved (default {_default('step_cost_rounds')}; 0: none).", min=0),
]  # fmt: skip

_LoraOption = Annotated[
    bool | None,
    typer.Option("--lora/--no-lora", help="Train LoRA adapters (peft; pip install 'dpobench[real]') instead of every "
                 "weight; the reference is the base model (default: off)."),
]  # fmt: skip
_LoraRankOption = Annotated[
    int | None, typer.Option(help=f"With --lora: the adapters' rank (default {_default('lora_rank')}).", min=1)
]
_LoraAlphaOption = Annotated[
    float | None, typer.Option(help=f"With --lora: their scale is alpha / rank (default {_default('lora_alpha')}).")
]
_LoraTargetsOption = Annotated[
    str | None,
    typer.Option(help="With --lora: comma-separated module names the adapters go on (default all-linear: every "
                 "linear layer but the output head)."),
]  # fmt: skip


@app.command("run")
def run(
    variants: _VariantsOption = None,
    betas: _BetasOption = None,
    seeds: _SeedsOption = None,
    scenarios: _ScenariosOption = None,
    steps: _StepsOption = None,
    batch_size: _BatchSizeOption = None,
    lr: _LrOption = None,
    model: _ModelOption = None,
    data: _DataOption = None,
    split: _SplitOption = None,
    judge: _JudgeOption = None,
    device: _DeviceOption = None,
    eval_every: _EvalEveryOption = None,
    length_buckets: _LengthBucketsOption = None,
    compile: _CompileOption = None,
    cuda_graphs: _CudaGraphsOption = None,
    share_prompt: _SharePromptOption = None,
    preset: _PresetOption = None,
    config: _ConfigOption = None,
    out: _OutOption = Path("dpobench-results"),
    labels: _LabelsOption = None,
    train_prompts: _TrainPromptsOption = None,
    heldout_prompts: _HeldoutPromptsOption = None,
    eval_prompts: _EvalPromptsOption = None,
    chat_prompts: _ChatPromptsOption = None,
    param: _ParamOption = None,
    report: _ReportOption = True,
    executor: _ExecutorOption = None,
    ray_address: _RayAddressOption = None,
    threads_per_cell: _ThreadsPerCellOption = None,
    cells_per_gpu: _CellsPerGpuOption = None,
    parallel_cells: _ParallelCellsOption = None,
    step_cost_rounds: _StepCostRoundsOption = None,
    lora: _LoraOption = None,
    lora_rank: _LoraRankOption = None,
    lora_alpha: _LoraAlphaOption = None,
    lora_targets: _LoraTargetsOption = None,
) -> None:
    """Train every variant identically on a small real model and compare them (resumable)."""
    from dpobench.config import FILE_KEYS, load_config
    from dpobench.methods import is_method

    given = {name: value for name, value in locals().items() if name in FILE_KEYS and name != "params"}
    note = lambda message: err.print(f"[dim]{escape(message)}[/]", highlight=False)  # noqa: E731
    sweep = _user_errors(lambda: load_config(given, file=config, param=param or [], note=note))
    plugins = _load()
    broken = len(plugins.errors)
    for name in sweep.variants:  # a variant of a plugin that failed to load: say so, not a look-alike's name
        if broken and name not in plugins.registry and not is_method(name, plugins.registry):
            raise CLIError(f"unknown loss variant {name!r}: {broken} plugin{'s' * (broken != 1)} failed to load (the "
                           "error above) and may define it; fix it, or drop the variant from --variants")  # fmt: skip
    started = time.perf_counter()
    summary = _run_sweep(sweep, out)
    from dpobench.tables import is_reference, summary_csv

    _write_atomic_csv(summary_csv(summary), out / "summary.csv")
    _print_summary(summary)
    _print_verdict(summary, out)
    if report:
        _write_run_report(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = int((~is_reference(summary)).sum())
    err.print(
        f"{ours} cell{'s' * (ours != 1)} of this command (and the reference) in {out / 'results.sqlite'}; "
        f"summary in {out / 'summary.csv'}"
        f"{'; report.html and report.pdf beside them' if report else ''} "
        f"({time.perf_counter() - started:.0f} s)", highlight=False,
    )  # fmt: skip
    if broken:  # the sweep ran without them: its exit status says so
        err.print(f"{broken} plugin{'s' * (broken != 1)} failed to load (the error above): their variants did not run",
                  highlight=False)  # fmt: skip
    if broken or (summary.status != "done").any():
        raise typer.Exit(1)


def _user_errors(call: Callable[[], T]) -> T:
    """``call()``, with the errors a user can fix (bad settings, data, store, model) as one line."""
    from dpobench.config import SweepError
    from dpobench.data import DataError
    from dpobench.models import ModelError
    from dpobench.store import StoreError

    try:
        return call()
    except (SweepError, DataError, StoreError, ModelError) as error:
        raise CLIError(str(error)) from None


def _run_sweep(sweep: object, out: Path) -> object:
    """The sweep, with a progress bar, Ctrl-C finishing the step in progress, and one-line errors."""
    import shlex

    from transformers.utils import logging as hf_logging

    from dpobench.sweep import SweepInterrupted, run_sweep

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    command = shlex.join(["dpobench", *sys.argv[1:]])
    with _sweep_progress() as cells, _stop_after_step(cells) as stop:
        try:
            return _user_errors(lambda: run_sweep(
                sweep, out, command=command, progress=_starting, cell_progress=cells, should_stop=stop,
            ))  # type: ignore[arg-type]  # fmt: skip
        except SweepInterrupted as interrupted:
            err.print(f"interrupted: finished cells are in the store; rerun the same command to resume "
                      f"({interrupted}): {command}", highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(130) from None
        except KeyboardInterrupt:  # Ctrl-C twice, or once while the sweep started (Typer would exit without a word)
            starting = _options.get("starting")
            if starting:  # what the start was doing is dropped whole: caches are written only once complete
                err.print(f"interrupted while the sweep started ({starting}): nothing of that step is kept; rerun "
                          "the same command to start again", highlight=False, soft_wrap=True)  # fmt: skip
            else:  # finished cells are already committed; the cell in training is dropped whole
                err.print(f"interrupted: finished cells are in the store; rerun the same command to resume: {command}",
                          highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(130) from None


def _starting(message: str) -> None:
    """A line of the sweep's start (the SFT model, the pairs, …), kept so that a Ctrl-C can say what it stopped."""
    _options["starting"] = message
    err.print(f"[dim]{escape(message)}[/]", highlight=False)


def _write_run_report(out: Path) -> None:
    from dpobench.report import write_report

    try:
        with err.status("writing report.html and report.pdf"):
            write_report(out / "results.sqlite", out)
    except KeyboardInterrupt:  # after the status line is gone, so that this line stays
        err.print(f"interrupted while writing the report: every cell is in the store; `dpobench report {out}` "
                  "writes it", highlight=False)  # fmt: skip
        raise typer.Exit(130) from None


@app.command("report")
def report(
    store: Annotated[Path, typer.Argument(help="An output directory of `dpobench run` (holds results.sqlite).")],
    to: Annotated[Path | None, typer.Option(help="Where to write (default: reports/<run-id>/).")] = None,
    format: Annotated[str, typer.Option("--format", help="html, pdf or html,pdf.")] = "html,pdf",
    metric: Annotated[
        str | None,
        typer.Option(
            help="Metric to rank variants by (default: gold_reward; for pairs from --data, heldout_reward_accuracy)."
        ),
    ] = None,
    bench: Annotated[Path | None, typer.Option(help="pytest-benchmark JSON to add as a throughput table.")] = None,
) -> None:
    """Rebuild the HTML and PDF report from a results store (several runs in one store are compared)."""
    from dpobench.metrics import rankable
    from dpobench.report import write_report

    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    if not formats or set(formats) - {"html", "pdf"}:
        raise CLIError(f"--format {format!r}: use html, pdf or html,pdf")
    choices = rankable()  # the catalogue's metrics with a direction
    if metric is not None and metric not in choices:
        import difflib

        close = [m for m in choices if m.startswith(metric)] or difflib.get_close_matches(metric, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CLIError(f"--metric {metric!r}: {hint}use one of {', '.join(choices)}")
    database, runs = _store_runs(store)
    _load()
    target = to or Path("reports") / runs[-1]["run_id"]
    try:
        written = write_report(database, target, formats, metric, bench)
    except ValueError as error:
        raise CLIError(str(error)) from None
    except OSError as error:  # --to names a file, or a place that cannot be written
        raise CLIError(
            f"--to {str(target)!r} is not writable ({error.strerror or error}); choose another directory"
        ) from None
    for path in written:
        out.print(f"wrote {path}", highlight=False)


def _store_runs(store: Path) -> tuple[Path, list[dict[str, object]]]:
    """A store's SQLite file and its runs; one line naming the store where it is not one, or holds no run."""
    import sqlite3

    import pandas as pd

    from dpobench.store import StoreError, results_file
    from dpobench.tables import run_info

    database = results_file(store)
    if not database.is_file():
        raise CLIError(f"{store}: no results.sqlite here; give the --out directory of `dpobench run`")
    try:  # a file that is not a store, or another program's: sqlite's error, pandas' wrapping of it, or the store's
        runs = run_info(database)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError, StoreError) as error:
        reason = str(error).splitlines()[0].removeprefix(f"{database}: ")
        raise CLIError(
            f"{database}: not a dpobench results store ({reason}); give the --out directory of `dpobench run`"
        ) from None
    if not runs:
        raise CLIError(f"{database}: the store holds no runs yet; run `dpobench run --out {store}` first")
    return database, runs


@app.command("compare")
def compare(
    store_a: Annotated[Path, typer.Argument(help="An output directory of `dpobench run` (the first ranking).")],
    store_b: Annotated[Path, typer.Argument(help="Another one, with the same variants and β (the second ranking).")],
    scenario: Annotated[str, typer.Option(help="The scenario whose cells are ranked.")] = "clean",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap draws over the held-out prompts.", min=0)] = 1000,
) -> None:
    """Does the ranking transfer? Two runs' rankings by gold reward, Kendall's τ and Spearman's ρ between them with
    95% bootstrap intervals over the held-out prompts, and the configurations that moved most."""
    from rich.table import Table

    from dpobench.transfer import rank_transfer

    (database_a, _), (database_b, _) = _store_runs(store_a), _store_runs(store_b)
    _load()
    try:
        result = rank_transfer(database_a, database_b, scenario, draws=bootstrap)
    except ValueError as error:
        raise CLIError(str(error)) from None
    table = Table("configuration", "gold A", "rank A", "gold B", "rank B", "moved", "degenerate in", box=None)
    for row in result.table.itertuples(index=False):
        table.add_row(row.configuration, f"{row.gold_a:+.3f}", str(row.rank_a), f"{row.gold_b:+.3f}", str(row.rank_b),
                      f"{row.moved:+d}" if row.moved else "0", row.degenerate_in)  # fmt: skip
    _wide().print(table)
    out.print(result.summary(), highlight=False)


@contextlib.contextmanager
def _stop_after_step(cells: Any):
    """Ctrl-C while a cell trains: finish the step, keep every finished cell, exit. Twice: stop at once."""
    requested = {"stop": False}

    def handler(signum: int, frame: object) -> None:
        if requested["stop"] or not cells.training:
            raise KeyboardInterrupt
        requested["stop"] = True
        if cells.in_flight and cells.elsewhere:  # cells trained elsewhere (Ray) cannot finish their step: dropped
            err.print(f"stopping: cancelling the {cells.in_flight} cells in flight; finished cells are kept",
                      highlight=False)  # fmt: skip
        else:
            err.print("stopping after this step (Ctrl-C again to stop at once)", highlight=False)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


def _sweep_progress() -> Any:
    from dpobench.cells import Progress

    class SweepProgress(Progress):
        """One bar for the sweep (cells done of those to run, in flight, failed, time left) and, for a cell trained
        in this process, one for its steps."""

        training = False  # a Ctrl-C while cells train finishes their step; otherwise it stops at once

        def __enter__(self) -> SweepProgress:
            self.progress: Any = None  # started with the first cell: errors before it print on a clean line
            self.sweep = self.cell = None
            self.total = self.finished = self.failed = self.in_flight = 0
            self.elsewhere = False  # the cells in flight train in other processes (Ray), not side by side here
            return self

        def begin(self, cells: int) -> None:
            _options["starting"] = None  # the start is over: a Ctrl-C from here on stops cells, not the start
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.total = cells
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                transient=True,
            )  # fmt: skip
            self.progress.__enter__()
            self.sweep = self.progress.add_task(self._sweep_line(), total=cells)

        def start(self, label: str, steps: int) -> None:
            self.training = True
            if self.cell is not None:
                self.progress.remove_task(self.cell)
            self.cell = self.progress.add_task(label, total=steps)

        def advance(self, step: int) -> None:
            self.progress.update(self.cell, completed=step)

        def running(self, cells: int, here: bool = False) -> None:
            self.training, self.in_flight, self.elsewhere = cells > 0, cells, not here
            self.progress.update(self.sweep, description=self._sweep_line())

        def done(self, label: str, status: str, error: str = "", seconds: float = math.nan) -> None:
            self.training = self.in_flight > 0
            self.finished += 1
            self.failed += status != "done"
            self.progress.update(self.sweep, completed=self.finished, description=self._sweep_line())
            if status != "done":  # the cell's step and error, as the store and the report record them
                err.print(f"[bold red]{status}:[/] {escape(label)}{': ' + escape(error) if error else ''}",
                          highlight=False)  # fmt: skip
            elif not err.is_terminal:  # a log file gets no progress bar: one line per finished cell instead
                err.print(f"{escape(label)}: done in {seconds:.1f} s", highlight=False)

        def _sweep_line(self) -> str:
            parts = [f"{self.in_flight} in flight"] if self.in_flight else []  # running, or queued for a worker
            parts += [f"{self.failed} failed"] if self.failed else []
            return "cells" + (f" ({', '.join(parts)})" if parts else "")

        def __exit__(self, *exc: object) -> None:
            if self.progress is not None:
                self.progress.__exit__(*exc)

    return SweepProgress()


def _print_verdict(finals: object, out: Path) -> None:
    """Which loss the run supports, ranked by gold reward as the report ranks it: this command's cells were
    evaluated on the same prompts, so by paired differences (report.html says how it is chosen)."""
    import pandas as pd

    from dpobench.tables import has_gold, is_reference, read_samples, summary_table
    from dpobench.verdict import NO_PICK, verdict

    assert isinstance(finals, pd.DataFrame)
    if not has_gold(finals) or (~is_reference(finals)).sum() < 2:
        return
    ranked = summary_table(finals, "gold_reward", read_samples(out / "results.sqlite", "gold_reward"))
    decided = verdict(ranked, float(finals[is_reference(finals)].gold_reward.mean()))
    for line in decided.lines if decided else (NO_PICK,):
        err.print(escape(line), highlight=False)


def _print_summary(summary: object) -> None:
    import pandas as pd

    from dpobench.tables import variant_table

    assert isinstance(summary, pd.DataFrame)
    table_frame = variant_table(summary)
    from rich import box

    table = Table(
        title="per variant at the end of training (loss, margin, acc: mean of the last 10% of steps)",
        title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
    )  # fmt: skip
    # a configuration's label wraps at its spaces, never inside a word (min_width: its longest word)
    words = max((len(w) for label in table_frame.variant for w in str(label).split()), default=8)
    for column in table_frame.columns:
        table.add_column(
            column, justify="left" if column in ("variant", "scenario", "status") else "right",
            no_wrap=column != "variant", overflow="fold", min_width=min(words, 60) if column == "variant" else None,
        )  # fmt: skip
    for row in table_frame.itertuples(index=False):
        table.add_row(*[escape(str(v)) for v in row])  # "[...]" in a label is text, not rich markup
    # A summary squeezed into 80 columns is unreadable; wider lines wrap in a narrow terminal instead.
    _wide().print(table)


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.01,0.1,1") from None


def _write_atomic_csv(frame: object, path: Path) -> None:
    import pandas as pd

    assert isinstance(frame, pd.DataFrame)
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    except OSError as error:
        raise CLIError(f"cannot write {str(path)!r}: {error.strerror or error}; choose another --out") from None


#: options of `dpobench` itself that may also be written after the command, and whether each takes a value
_GLOBAL_OPTIONS = {"--plugins-dir": True, "--debug": False}


def global_options_first(argv: list[str]) -> list[str]:
    """``run --plugins-dir D …`` read as ``--plugins-dir D run …``: the global options found after the command
    move before it (Click accepts them only there). Nothing after a ``--`` moves."""
    start = 0
    while start < len(argv) and argv[start].startswith("-") and argv[start] != "--":
        start += 2 if _GLOBAL_OPTIONS.get(argv[start]) else 1
    moved, kept, index = [], argv[: start + 1], start + 1
    while index < len(argv) and argv[index] != "--":
        name = argv[index].split("=", 1)[0]
        takes_value = _GLOBAL_OPTIONS.get(name)
        if takes_value is None:
            kept.append(argv[index])
            index += 1
            continue
        width = 2 if takes_value and "=" not in argv[index] else 1
        moved += argv[index : index + width]
        index += width
    return argv[:start] + moved + kept[start:] + argv[index:]


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=global_options_first(sys.argv[1:]))
    except KeyboardInterrupt:  # outside a command (a command's own Ctrl-C says what it stopped)
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except (CLIError, ParamError, UnknownLossError) as error:
        if _options.get("debug"):
            raise
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
