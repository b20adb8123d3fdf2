"""The sweep: variants × β × seeds × scenarios, each cell trained identically, resumable from the store."""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import dpobench
from dpobench.data import (
    SCENARIOS,
    DataRecipe,
    TaskData,
    apply_scenario,
    load_pairs_file,
    make_task_data,
    require_pairs_file,
)
from dpobench.logprobs import cached_reference_logprobs
from dpobench.models import (
    SIZES,
    SFTRecipe,
    cache_root,
    check_model_source,
    load_model,
    model_fingerprint,
    reference_model,
)
from dpobench.plugins import get_losses
from dpobench.plugins import state as plugin_state
from dpobench.report import cell_finals, read_tidy
from dpobench.store import Store
from dpobench.train import (
    CUDA_GRAPH_MIN_STEPS_PER_WIDTH,
    CellResult,
    Evaluator,
    TrainConfig,
    check_cuda_graphs,
    resolve_compile,
    resolve_share_prompt,
    train_cell,
)

__all__ = ["PRESETS", "SweepConfig", "SweepError", "run_sweep"]

MAIN_VARIANTS = ("dpo", "cdpo", "ipo", "robust_dpo", "hinge", "simpo", "orpo", "cpo", "sppo_hard", "apo_zero",
                 "discopop", "len_reg_dpo", "dpop", "cal_dpo", "rpo")  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # every built-in variant at β = 0.1, one seed, clean data, the tiny model
    "quick": {"variants": (), "betas": (0.1,), "seeds": (0,), "scenarios": ("clean",), "steps": 150},
    "standard": {"variants": MAIN_VARIANTS, "betas": (0.01, 0.05, 0.1, 0.5, 1.0), "seeds": (0, 1, 2),
                 "scenarios": SCENARIOS, "steps": 200},
}  # fmt: skip


class SweepError(ValueError):
    """A sweep that cannot start as configured; the message says what to change."""


class SweepInterrupted(Exception):
    """Ctrl-C: the step in progress finished, every finished cell is in the store."""


@dataclass(frozen=True)
class SweepConfig:
    variants: tuple[str, ...] = ()  # empty: every registered variant
    betas: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] = (0,)
    scenarios: tuple[str, ...] = ("clean",)
    model: str = "tiny"  # a size name (dpobench builds and SFTs it) or a folder / Hub id
    data: str | None = None  # a JSONL / CSV / Parquet file of pairs instead of the synthetic task
    train: TrainConfig = field(default_factory=TrainConfig)
    noise: float = 0.2
    length_bonus: float = 0.03
    sft: SFTRecipe | None = None  # overrides the size's default SFT recipe (tests use short ones)
    #: per-variant parameter grids, {"seed_custom_dpo": {"length_normalization": (False, True)}}
    params: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    data_recipe: DataRecipe = field(default_factory=DataRecipe)

    def to_json(self) -> dict[str, Any]:
        blob = asdict(self)
        blob["train"] = asdict(self.train)
        return blob


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SweepError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise SweepError(f"--device {requested!r}: use auto, cpu or cuda")
    return requested


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dpobench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SweepError(
            f"--out {str(out)!r} is not writable ({error.strerror or error}); choose another directory"
        ) from None


def open_store(out: Path) -> Store:
    """The store in ``out``, or a one-line error saying why it cannot be used."""
    try:
        return Store(out / "results.sqlite")
    except sqlite3.DatabaseError as error:
        raise SweepError(f"{out / 'results.sqlite'} is not a dpobench store ({error}); choose another --out") from None


def distinct_variants(registry: Any) -> list[str]:
    """Every variant, less those that would train the very same loss as a named preset of the same class at their
    defaults: the generic ``combined`` (DPO + SFT by default) is RPO, which ``rpo`` names. "All variants" then
    trains each loss once; a variant named in ``--variants`` always trains."""

    def identity(spec: Any) -> tuple[type, str]:
        return spec.cls, repr(sorted((k, p.default) for k, p in spec.params.items()))

    presets = {identity(spec) for spec in registry.values() if spec.preset_of is not None}
    return [name for name, spec in registry.items() if spec.preset_of is not None or identity(spec) not in presets]


def _plugin_sources(specs: list[Any], loaded: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Where the sweep's variants came from: per plugin, its version (a loose file's: the hash of its text) and its
    source ("builtin", "entry point of DIST", or the file's path), for the report."""
    return {s.plugin: {"version": s.version, "source": loaded[s.plugin].source if s.plugin in loaded else ""}
            for s in specs}  # fmt: skip


def plan_cells(config: SweepConfig, specs: list[Any]) -> list[tuple[Any, Any, float, int, str]]:
    """(spec, loss, β, seed, scenario) of every cell, each loss built (so its parameters are checked) before
    anything trains. A variant's own β values (``--param VARIANT.beta=…``) replace ``--betas`` for it alone."""
    cells = []
    for spec in specs:
        grid = dict(config.params.get(spec.name, {}))
        betas = config.betas
        if "beta" in grid and "beta" in spec.params:
            betas = tuple(_own_beta(spec.name, value) for value in grid.pop("beta"))
        for beta, seed, scenario in itertools.product(betas, config.seeds, config.scenarios):
            for values in itertools.product(*grid.values()):
                params = {**dict(zip(grid, values, strict=True)), **({"beta": beta} if "beta" in spec.params else {})}
                loss = spec.build(**params)  # parameters validated before anything trains
                cells.append((spec, loss, beta if "beta" in spec.params else math.nan, seed, scenario))
    return cells


def _own_beta(variant: str, value: object) -> float:
    try:
        beta = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0") from None
    if not beta > 0:
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0")
    return beta


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cell_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    command: str = "",
    progress: Callable[[str], None] = print,
    cell_progress: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> pd.DataFrame:
    """Run every cell not yet in ``out/results.sqlite``; return the per-cell summary. A sweep refused before it
    wrote anything leaves no empty ``out`` behind."""
    created = not out.exists()
    try:
        return _run_sweep(config, out, command=command, progress=progress, cell_progress=cell_progress,
                          should_stop=should_stop)  # fmt: skip
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    command: str,
    progress: Callable[[str], None],
    cell_progress: Any,
    should_stop: Callable[[], bool] | None,
) -> pd.DataFrame:
    import transformers

    registry, loaded = get_losses(), plugin_state().info
    names = list(config.variants) or distinct_variants(registry)
    specs = [registry[n] for n in names]  # unknown names fail here, before any training
    for scenario in config.scenarios:
        if scenario not in SCENARIOS:
            raise SweepError(f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIOS)}")
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
    cells = plan_cells(config, specs)
    if config.data and config.data_recipe.labels != DataRecipe().labels:
        raise SweepError(
            f"--labels {config.data_recipe.labels}: labels the synthetic task's pairs; drop it with --data"
        )
    if config.data and set(config.scenarios) != {"clean"}:
        raise SweepError(
            "--scenarios noisy/length-biased need the synthetic task's gold labels; drop --data or use clean"
        )
    device = resolve_device(config.train.device)
    train_config = replace(config.train, device=device)
    try:
        check_cuda_graphs(train_config.cuda_graphs, device, False if train_config.compile is False else None)
    except ValueError as error:
        raise SweepError(f"--cuda-graphs: {error}") from None
    check_writable(out)  # before the slow work: an unwritable --out fails at once
    check_model_source(config.model)  # as does a --model that names nothing
    if config.data:  # and a missing data file, before the model is built
        require_pairs_file(Path(config.data))
    if (out / "results.sqlite").exists():  # and a store that cannot be used, before the model is built
        open_store(out).close()

    if config.model in SIZES:
        recipe = config.sft or SFTRecipe(size=config.model)
        model_path: str | Path = reference_model(recipe, progress=progress, device=device)
    else:
        model_path = config.model
    reference, tokenizer = load_model(model_path, device="cpu")
    policy = copy.deepcopy(reference)  # the same weights, without reading the files a second time
    reference_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    model_hash = model_fingerprint(model_path)
    compiled = resolve_compile(train_config.compile, device, reference)  # as every cell will train: part of its id
    try:
        check_cuda_graphs(train_config.cuda_graphs, device, compiled)
    except ValueError as error:
        raise SweepError(f"--cuda-graphs: {error}") from None
    try:
        shared = resolve_share_prompt(train_config.share_prompt, device, reference)
    except ValueError as error:
        raise SweepError(f"--share-prompt: {error}") from None
    reference.to(device)

    if config.data:
        max_length = getattr(reference.config, "max_position_embeddings", 512) or 512
        data: TaskData = load_pairs_file(config.data, tokenizer, max_length=min(max_length, 1024))
    else:
        progress("sampling preference pairs from the reference model")
        data = make_task_data(reference, tokenizer, config.data_recipe, device=device)
    data_hash = data.train.fingerprint() + data.heldout.fingerprint()
    cut = data.train.truncated
    progress(f"{len(data.train.pairs)} training pairs, {len(data.heldout.pairs)} held-out pairs"
             + (f"; {cut} pair{'s' * (cut != 1)} cut to the model's length (completions truncated, EOS kept)"
                if cut else ""))  # fmt: skip

    ref_key = f"{model_hash}|{data_hash}"
    cache = cache_root()
    train_ref = cached_reference_logprobs(
        reference, data.train.pairs, tokenizer.pad_token_id, ref_key + "|train", cache, device=device, autocast=train_config.autocast
    )  # fmt: skip
    heldout_ref = cached_reference_logprobs(
        reference, data.heldout.pairs, tokenizer.pad_token_id, ref_key + "|heldout", cache, device=device,
        autocast=train_config.autocast,
    )  # fmt: skip
    evaluator = Evaluator(reference, tokenizer, data, heldout_ref, device=device, autocast=train_config.autocast)

    store = open_store(out)  # only now: a sweep stopped by bad data or a bad model leaves no store behind
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + _cell_id(config.to_json(), model_hash, data_hash)[:6]
    versions = {
        "dpobench_version": dpobench.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }  # fmt: skip
    store.add_run(
        run_id, command=command, config=config.to_json(), git_commit=_git_commit(), model=str(config.model),
        model_hash=model_hash, data_hash=data_hash, device=device, dtype=train_config.dtype,
        info={**data.info, "truncated": data.train.truncated, "share_prompt": shared,
              "cuda_graphs": train_config.cuda_graphs, "plugins": _plugin_sources(specs, loaded)}, **versions,
    )  # fmt: skip
    base_cell = {"run_id": run_id, "model": str(config.model), "model_hash": model_hash, "device": device,
                 "dtype": train_config.dtype}  # fmt: skip

    # The reference model's own metrics: the point every variant starts from (KL 0), per seed.
    references = {seed: _cell_id("reference", seed, model_hash, data_hash, train_config.max_grad_norm)
                  for seed in config.seeds}  # fmt: skip
    for seed, cell_id in references.items():
        if not store.finished(cell_id):
            evaluation = evaluator(reference, 0, None, seed)
            store.write_cell(
                {**base_cell, "cell_id": cell_id, "variant": "(reference)", "plugin": "", "plugin_version": "",
                 "params": "{}", "beta": math.nan, "seed": seed, "scenario": "clean", "config": "{}", "status": "done",
                 "error": "", "started": time.time(), "finished": time.time(), "seconds": 0.0},
                [], [evaluation],
            )  # fmt: skip

    trains = {
        s: apply_scenario(data.train, s, noise=config.noise, length_bonus=config.length_bonus) for s in config.scenarios
    }
    todo = []
    ours = set(references.values())  # this command's cells: the summary it returns
    builtin_plugins = {name for name, info in loaded.items() if info.builtin}
    for spec, loss, beta, seed, scenario in cells:
        # share_prompt is the run's (its info), not the cell's: a batch layout whose log-probs equal the other's within
        # float rounding (tests/test_logprobs.py), so a store resumes either way and its report pools both. So is
        # cuda_graphs: the compiled layers' own kernels, replayed (within bf16 rounding on an H200, benchmarks/RESULTS.md)
        train_json = {**{k: v for k, v in asdict(train_config).items()
                         if k not in ("device", "share_prompt", "cuda_graphs")}, "compile": compiled}  # fmt: skip
        # a plugin's code is part of its cells' identity (its version: a loose file's hash, an installed plugin's
        # version and source hash), so edited code trains anew; the built-ins' is dpobench's, whose run records it
        code = () if spec.plugin in builtin_plugins else (spec.version,)
        cell_id = _cell_id(spec.name, loss.hparams, seed, scenario, model_hash, data_hash, train_json, device,
                           config.noise, config.length_bonus, *code)  # fmt: skip
        ours.add(cell_id)
        if store.finished(cell_id):
            continue
        todo.append((cell_id, spec, loss, beta, seed, scenario, train_json))
    progress(f"{len(cells)} cells, {len(cells) - len(todo)} already in the store, {len(todo)} to run")
    if todo:  # after the data and settings checks, so that an error there stays the only line
        if compiled:
            progress("training steps compile once per process (torch.compile; --no-compile: eager)")
            if device.startswith("cuda") and train_config.cuda_graphs is None:
                progress(f"and run as CUDA graphs in cells of {CUDA_GRAPH_MIN_STEPS_PER_WIDTH} or more steps per "
                         "batch width (--no-cuda-graphs: never)")  # fmt: skip
        if shared:
            progress(
                "each pair trains as one row, its prompt through the model once (--no-share-prompt: separate rows)"
            )

    for number, (cell_id, spec, loss, beta, seed, scenario, train_json) in enumerate(todo, start=1):
        started = time.time()
        extra = " ".join(f"{k}={v}" for k, v in loss.hparams.items() if k in config.params.get(spec.name, {}))
        label = f"[{number}/{len(todo)}] {spec.name} β={beta:g} seed={seed} {scenario} {extra}".rstrip()
        if cell_progress:
            cell_progress.start(label, train_config.steps)
        loss.to(device)
        try:
            result = train_cell(
                policy, reference_state, loss, trains[scenario], train_ref, tokenizer.pad_token_id, train_config,
                seed, evaluate=lambda model, step, loss=loss, seed=seed: evaluator(model, step, loss, seed),
                on_step=cell_progress.advance if cell_progress else None, should_stop=should_stop,
            )  # fmt: skip
        except torch.cuda.OutOfMemoryError as error:  # one cell too big must not end the sweep
            result = CellResult(status="failed", error=f"CUDA out of memory: {str(error).splitlines()[0]}")
        if result.status == "interrupted":
            store.close()
            raise SweepInterrupted(
                f"interrupted in cell {spec.name}; {number - 1} of {len(todo)} cells of this run finished"
            )
        store.write_cell(
            {**base_cell, "cell_id": cell_id, "variant": spec.name, "plugin": spec.plugin,
             "plugin_version": spec.version, "params": json.dumps(loss.hparams, sort_keys=True, default=str),
             "beta": beta, "seed": seed, "scenario": scenario, "config": json.dumps(train_json, sort_keys=True),
             "status": result.status, "error": result.error, "started": started, "finished": time.time(),
             "seconds": time.time() - started},
            result.steps, result.evaluations,
        )  # fmt: skip
        if cell_progress:
            cell_progress.done(label, result.status, result.error)
        if should_stop is not None and should_stop():  # Ctrl-C after the cell's last step: it is kept, and so is
            store.close()  # the request to stop (the cells left, or the summary and report, wait for a rerun)
            raise SweepInterrupted(
                f"stopped after cell {spec.name}; {number} of {len(todo)} cells of this run finished"
            )
    store.close()
    finals = cell_finals(read_tidy(out / "results.sqlite"))
    others = int((~finals.cell_id.isin(ours)).sum())
    if others:  # the store accumulates runs; this command's summary is its own cells
        progress(f"the store also holds {others} cells of other commands' settings: the report compares them all; "
                 "this summary and summary.csv hold this command's cells")  # fmt: skip
    return finals[finals.cell_id.isin(ours)].reset_index(drop=True)
