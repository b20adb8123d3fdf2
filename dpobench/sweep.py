"""The sweep: variants × β × seeds × scenarios, each cell trained identically, resumable from the store.

Three steps, each a function a reader can follow on its own:

- ``plan_sweep``: the cells, every setting checked, nothing built (no model, no data, no store);
- ``prepare``: what every cell shares, built once (the reference model, the pairs, the reference log-probs, the
  evaluator, the fast path);
- ``run_cell``: one cell, a function of (prepared, cell) alone, so that an executor may run cells elsewhere.

``run_sweep`` drives them, skipping the cells the store already holds and committing each finished one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import dpobench
from dpobench.acceleration import CUDA_GRAPH_MIN_STEPS_PER_WIDTH, Acceleration, plan_acceleration
from dpobench.config import (
    PRESETS,
    SweepConfig,
    SweepError,
    TrainConfig,
    check_config,
    distinct_variants,
    resolve_device,
    select_variants,
)
from dpobench.data import PairSet, TaskData, apply_scenario, load_pairs_file, make_task_data, require_pairs_file
from dpobench.logprobs import cached_reference_logprobs
from dpobench.losses import PreferenceLoss
from dpobench.models import SIZES, SFTRecipe, cache_root, check_model_source, load_model, model_fingerprint
from dpobench.models import reference_model as build_reference_model
from dpobench.plugins import get_losses
from dpobench.plugins import state as plugin_state
from dpobench.registry import LossSpec
from dpobench.store import Store
from dpobench.tables import cell_finals, read_tidy
from dpobench.train import CellResult, Evaluator, train_cell

__all__ = [
    "PRESETS",
    "Cell",
    "Prepared",
    "SweepConfig",
    "SweepError",
    "SweepPlan",
    "TrainConfig",
    "distinct_variants",
    "plan_cells",
    "plan_sweep",
    "prepare",
    "run_cell",
    "run_sweep",
]


class SweepInterrupted(Exception):
    """Ctrl-C: the step in progress finished, every finished cell is in the store."""


@dataclass(frozen=True)
class Cell:
    """One configuration to train: a variant with its parameters, β, seed and scenario."""

    spec: LossSpec
    loss: PreferenceLoss
    beta: float  # NaN for a variant without β
    seed: int
    scenario: str


@dataclass(frozen=True)
class SweepPlan:
    """A checked configuration and its cells; nothing built yet."""

    config: SweepConfig
    device: str
    cells: list[Cell]


def plan_sweep(config: SweepConfig) -> SweepPlan:
    """The cells of ``config``, every setting checked before anything is built. Raises ``SweepError`` (or the
    registry's ``UnknownLossError``), one line."""
    registry = get_losses()
    names = select_variants(config, registry)
    device = resolve_device(config.device)
    check_config(config, names, device)
    return SweepPlan(config, device, plan_cells(config, [registry[n] for n in names]))


def plan_cells(config: SweepConfig, specs: list[LossSpec]) -> list[Cell]:
    """Every cell, each loss built (so its parameters are checked) before anything trains. A variant's own β values
    (``--param VARIANT.beta=…``) replace ``--betas`` for it alone."""
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
                cells.append(Cell(spec, loss, beta if "beta" in spec.params else math.nan, seed, scenario))
    return cells


def _own_beta(variant: str, value: object) -> float:
    try:
        beta = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0") from None
    if not beta > 0:
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0")
    return beta


@dataclass
class Prepared:
    """What every cell of a sweep shares, built once: the reference model and a policy to train from it, the pairs
    of each scenario, the reference log-probs, the evaluator, and the fast path on this device."""

    plan: SweepPlan
    reference: Any
    policy: Any
    reference_state: dict[str, torch.Tensor]
    tokenizer: Any
    data: TaskData
    trains: dict[str, PairSet]
    train_reference: tuple[torch.Tensor, torch.Tensor]
    evaluator: Evaluator
    acceleration: Acceleration
    model_hash: str
    data_hash: str
    #: the training settings that are part of every cell's identity (the compile setting as decided)
    train_json: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> SweepConfig:
        return self.plan.config


def check_sources(config: SweepConfig, out: Path) -> None:
    """Fail at once, before the slow work, for an unwritable ``out``, a ``--model`` that names nothing, a missing
    data file, or a store that cannot be used."""
    check_writable(out)
    check_model_source(config.model)
    if config.data:
        require_pairs_file(Path(config.data))
    if (out / "results.sqlite").exists():
        open_store(out).close()


def prepare(plan: SweepPlan, progress: Callable[[str], None] = print) -> Prepared:
    """Build what every cell shares: the reference model (trained and cached for a named size), the pairs, the
    reference log-probs (cached on disk), the evaluator and the acceleration plan."""
    config, device = plan.config, plan.device
    if config.model in SIZES:
        recipe = config.sft or SFTRecipe(size=config.model)
        model_path: str | Path = build_reference_model(recipe, progress=progress, device=device)
    else:
        model_path = config.model
    reference, tokenizer = load_model(model_path, device="cpu")
    policy = copy.deepcopy(reference)  # the same weights, without reading the files a second time
    reference_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    try:
        acceleration = plan_acceleration(config.speed, device, reference)
    except ValueError as error:
        raise SweepError(str(error)) from None
    reference.to(device)
    data = _task_data(config, reference, tokenizer, device, progress)
    model_hash = model_fingerprint(model_path)
    data_hash = data.train.fingerprint() + data.heldout.fingerprint()
    ref_key, cache, autocast = f"{model_hash}|{data_hash}", cache_root(), acceleration.autocast
    pad_id = tokenizer.pad_token_id
    train_ref = cached_reference_logprobs(reference, data.train.pairs, pad_id, ref_key + "|train", cache,
                                          device=device, autocast=autocast)  # fmt: skip
    heldout_ref = cached_reference_logprobs(reference, data.heldout.pairs, pad_id, ref_key + "|heldout", cache,
                                            device=device, autocast=autocast)  # fmt: skip
    trains = {
        s: apply_scenario(data.train, s, noise=config.noise, length_bonus=config.length_bonus) for s in config.scenarios
    }
    return Prepared(
        plan=plan, reference=reference, policy=policy, reference_state=reference_state, tokenizer=tokenizer,
        data=data, trains=trains, train_reference=train_ref,
        evaluator=Evaluator(reference, tokenizer, data, heldout_ref, device=device, autocast=autocast),
        acceleration=acceleration, model_hash=model_hash, data_hash=data_hash,
        # the batch layout and CUDA graphs are not part of a cell's identity: the same log-probs within float
        # rounding (tests/test_logprobs.py; within bf16 rounding on an H200), so a store resumes either way
        train_json={**asdict(config.train), "compile": acceleration.compile},
    )  # fmt: skip


def _task_data(config: SweepConfig, reference: Any, tokenizer: Any, device: str, progress: Callable) -> TaskData:
    if config.data:
        max_length = getattr(reference.config, "max_position_embeddings", 512) or 512
        data = load_pairs_file(config.data, tokenizer, max_length=min(max_length, 1024))
    else:
        progress("sampling preference pairs from the reference model")
        data = make_task_data(reference, tokenizer, config.data_recipe, device=device)
    cut = data.train.truncated
    progress(f"{len(data.train.pairs)} training pairs, {len(data.heldout.pairs)} held-out pairs"
             + (f"; {cut} pair{'s' * (cut != 1)} cut to the model's length (completions truncated, EOS kept)"
                if cut else ""))  # fmt: skip
    return data


def cell_id(prepared: Prepared, cell: Cell, builtin: bool) -> str:
    """A cell's identity: what it trains and on what. A plugin's code is part of it (its version: a loose file's
    hash, an installed plugin's version and source hash), so edited code trains anew; the built-ins' code is
    dpobench's, which the run records."""
    config = prepared.config
    code = () if builtin else (cell.spec.version,)
    return _hash(cell.spec.name, cell.loss.hparams, cell.seed, cell.scenario, prepared.model_hash,
                 prepared.data_hash, prepared.train_json, prepared.plan.device, config.noise, config.length_bonus,
                 *code)  # fmt: skip


def reference_cell_id(prepared: Prepared, seed: int) -> str:
    return _hash("reference", seed, prepared.model_hash, prepared.data_hash, prepared.config.train.max_grad_norm)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_cell(
    prepared: Prepared, cell: Cell, on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CellResult:  # fmt: skip
    """Train and evaluate one cell from the reference weights; a cell too big for the GPU fails alone."""
    evaluator, loss, seed = prepared.evaluator, cell.loss, cell.seed
    loss.to(prepared.plan.device)
    try:
        return train_cell(
            prepared.policy, prepared.reference_state, loss, prepared.trains[cell.scenario], prepared.train_reference,
            prepared.tokenizer.pad_token_id, prepared.config.train, seed,
            evaluate=lambda model, step: evaluator(model, step, loss, seed), on_step=on_step, should_stop=should_stop,
            acceleration=prepared.acceleration,
        )  # fmt: skip
    except torch.cuda.OutOfMemoryError as error:
        return CellResult(status="failed", error=f"CUDA out of memory: {str(error).splitlines()[0]}")


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    command: str = "",
    progress: Callable[[str], None] = print,
    cell_progress: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> pd.DataFrame:
    """Run every cell not yet in ``out/results.sqlite``; return the per-cell summary of this command's cells. A
    sweep refused before it wrote anything leaves no empty ``out`` behind."""
    created = not out.exists()
    try:
        plan = plan_sweep(config)
        check_sources(config, out)
        prepared = prepare(plan, progress)
        store = open_store(out)  # only now: a sweep stopped by bad data or a bad model leaves no store behind
        try:
            ours = _execute(prepared, store, command, progress, cell_progress, should_stop)
        finally:
            store.close()
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finals = cell_finals(read_tidy(out / "results.sqlite"))
    others = int((~finals.cell_id.isin(ours)).sum())
    if others:  # the store accumulates runs; this command's summary is its own cells
        progress(f"the store also holds {others} cells of other commands' settings: the report compares them all; "
                 "this summary and summary.csv hold this command's cells")  # fmt: skip
    return finals[finals.cell_id.isin(ours)].reset_index(drop=True)


def _execute(
    prepared: Prepared, store: Store, command: str, progress: Callable[[str], None], cell_progress: Any,
    should_stop: Callable[[], bool] | None,
) -> set[str]:  # fmt: skip
    """Record the run, evaluate the reference, train every cell the store lacks, committing each as it finishes.
    Returns the ids of this command's cells."""
    config, plan = prepared.config, prepared.plan
    run_id = _record_run(prepared, store, command)
    base = {"run_id": run_id, "model": str(config.model), "model_hash": prepared.model_hash, "device": plan.device,
            "dtype": prepared.acceleration.dtype}  # fmt: skip
    ours = set()
    for seed in config.seeds:  # the reference model's own metrics: where every variant starts (KL 0), per seed
        reference_id = reference_cell_id(prepared, seed)
        ours.add(reference_id)
        if not store.finished(reference_id):
            evaluation = prepared.evaluator(prepared.reference, 0, None, seed)
            store.write_cell(
                {**base, "cell_id": reference_id, "role": "reference", "variant": "(reference)", "plugin": "",
                 "plugin_version": "", "params": "{}", "beta": math.nan, "seed": seed, "scenario": "clean",
                 "config": "{}", "status": "done", "error": "", "started": time.time(), "finished": time.time(),
                 "seconds": 0.0},
                [], [evaluation],
            )  # fmt: skip
    builtin = {name for name, info in plugin_state().info.items() if info.builtin}
    todo = []
    for cell in plan.cells:
        identity = cell_id(prepared, cell, cell.spec.plugin in builtin)
        ours.add(identity)
        if not store.finished(identity):
            todo.append((identity, cell))
    progress(f"{len(plan.cells)} cells, {len(plan.cells) - len(todo)} already in the store, {len(todo)} to run")
    if todo:  # after the data and settings checks, so that an error there stays the only line
        _explain_acceleration(prepared.acceleration, config, progress)
    for number, (identity, cell) in enumerate(todo, start=1):
        started = time.time()
        extra = " ".join(f"{k}={v}" for k, v in cell.loss.hparams.items() if k in config.params.get(cell.spec.name, {}))
        label = f"[{number}/{len(todo)}] {cell.spec.name} β={cell.beta:g} seed={cell.seed} {cell.scenario} {extra}"
        label = label.rstrip()
        if cell_progress:
            cell_progress.start(label, config.train.steps)
        result = run_cell(prepared, cell, cell_progress.advance if cell_progress else None, should_stop)
        if result.status == "interrupted":
            raise SweepInterrupted(
                f"interrupted in cell {cell.spec.name}; {number - 1} of {len(todo)} cells of this run finished"
            )
        store.write_cell(
            {**base, "cell_id": identity, "role": "variant", "variant": cell.spec.name, "plugin": cell.spec.plugin,
             "plugin_version": cell.spec.version, "params": json.dumps(cell.loss.hparams, sort_keys=True, default=str),
             "beta": cell.beta, "seed": cell.seed, "scenario": cell.scenario,
             "config": json.dumps(prepared.train_json, sort_keys=True), "status": result.status,
             "error": result.error, "started": started, "finished": time.time(), "seconds": time.time() - started},
            result.steps, result.evaluations,
        )  # fmt: skip
        if cell_progress:
            cell_progress.done(label, result.status, result.error)
        if should_stop is not None and should_stop():  # Ctrl-C after the cell's last step: it is kept, and so is
            raise SweepInterrupted(  # the request to stop (the cells left, or the summary and report, wait for a rerun)
                f"stopped after cell {cell.spec.name}; {number} of {len(todo)} cells of this run finished"
            )
    return ours


def _record_run(prepared: Prepared, store: Store, command: str) -> str:
    import transformers

    config, acceleration = prepared.config, prepared.acceleration
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + _hash(config.to_json(), prepared.model_hash, prepared.data_hash)[:6]
    loaded = plugin_state().info
    plugins = {c.spec.plugin: {"version": c.spec.version, "source": loaded[c.spec.plugin].source
                               if c.spec.plugin in loaded else ""} for c in prepared.plan.cells}  # fmt: skip
    store.add_run(
        run_id, command=command, config=config.to_json(), git_commit=_git_commit(), model=str(config.model),
        model_hash=prepared.model_hash, data_hash=prepared.data_hash, device=prepared.plan.device,
        dtype=acceleration.dtype, dpobench_version=dpobench.__version__, torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        info={**prepared.data.info, "truncated": prepared.data.train.truncated,
              "share_prompt": acceleration.share_prompt, "cuda_graphs": config.speed.cuda_graphs, "plugins": plugins},
    )  # fmt: skip
    return run_id


def _explain_acceleration(acceleration: Acceleration, config: SweepConfig, progress: Callable[[str], None]) -> None:
    if acceleration.compile:
        progress("training steps compile once per process (torch.compile; --no-compile: eager)")
        if acceleration.autocast and config.speed.cuda_graphs is None:
            progress(f"and run as CUDA graphs in cells of {CUDA_GRAPH_MIN_STEPS_PER_WIDTH} or more steps per "
                     "batch width (--no-cuda-graphs: never)")  # fmt: skip
    if acceleration.share_prompt:
        progress("each pair trains as one row, its prompt through the model once (--no-share-prompt: separate rows)")


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


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
