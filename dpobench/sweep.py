"""The sweep: variants × β × seeds × scenarios, each cell trained identically, resumable from the store.

Three steps, each a function a reader can follow on its own:

- ``plan_sweep``: the cells, every setting checked, nothing built (no model, no data, no store);
- ``prepare``: what every cell shares, built once (the reference model, the pairs, the reference log-probs, the
  evaluator, the fast path);
- ``run_cell``: one cell, a function of (prepared, cell) alone, so that an executor may run cells elsewhere
  (``dpobench.cells``: the cells, the prepared sweep and the executors that run them).

``run_sweep`` drives them, skipping the cells the store already holds and committing each finished one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import dpobench
from dpobench._util import one_line
from dpobench.acceleration import plan_acceleration
from dpobench.cells import (
    Cell,
    Executor,
    Finished,
    Pending,
    Prepared,
    Progress,
    SweepPlan,
    run_cell,
    run_in_process,
)
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
from dpobench.data import (
    DataRecipe,
    PairSet,
    TaskData,
    apply_scenario,
    cached_task_data,
    desirable_ratio,
    load_pairs_file,
    require_pairs_file,
    scenario_examples,
)
from dpobench.judges import Judge, JudgeError, load_judge
from dpobench.logprobs import cached_example_reference, cached_reference_logprobs
from dpobench.losses import MOVING_REFERENCE, TOKEN_LOGPS
from dpobench.methods import Method, MethodSpec, resolve_names
from dpobench.models import (
    SIZES,
    SFTRecipe,
    cache_root,
    check_model_source,
    load_model,
    model_fingerprint,
    resolve_model,
)
from dpobench.models import reference_model as build_reference_model
from dpobench.plugins import get_losses
from dpobench.plugins import state as plugin_state
from dpobench.registry import LossSpec
from dpobench.reward_model import LEARNED_ABOVE, RewardModel, RewardRecipe, cached_reward_model
from dpobench.stepcost import configuration_key, measure_step_costs
from dpobench.store import Store
from dpobench.tables import cell_finals, read_tidy
from dpobench.train import Evaluator

__all__ = [
    "PRESETS",
    "Cell",
    "Executor",
    "Finished",
    "Pending",
    "Prepared",
    "Progress",
    "SweepConfig",
    "SweepError",
    "SweepPlan",
    "TrainConfig",
    "distinct_variants",
    "executor_for",
    "plan_cells",
    "plan_sweep",
    "prepare",
    "run_cell",
    "run_in_process",
    "run_sweep",
]


class SweepInterrupted(Exception):
    """Ctrl-C: the step in progress finished, every finished cell is in the store."""


def plan_sweep(config: SweepConfig) -> SweepPlan:
    """The cells of ``config``, every setting checked before anything is built. Raises ``SweepError`` (or the
    registry's ``UnknownLossError``), one line."""
    registry = get_losses()
    losses, methods = resolve_names(config.variants, registry)
    names = select_variants(replace(config, variants=tuple(losses)), registry) if losses or not methods else []
    device = resolve_device(config.device)
    check_config(config, [*names, *methods], device)
    cells = plan_cells(config, [*(registry[n] for n in names), *methods.values()])
    for scenario in config.scenarios:
        if desirable_ratio(scenario) and not any(c.scenario == scenario for c in cells):
            unpaired = ", ".join(n for n in registry if registry[n].cls.unpaired)
            raise SweepError(f"--scenarios {scenario}: only unpaired variants ({unpaired}) train there, and none of "
                             "this sweep's variants is one; add one with --variants, or drop the scenario")  # fmt: skip
    return SweepPlan(config, device, cells)


def plan_cells(config: SweepConfig, specs: list[LossSpec | MethodSpec]) -> list[Cell]:
    """Every cell, each loss (or method) built (so its parameters are checked) before anything trains. A variant's
    own β values (``--param VARIANT.beta=…``) replace ``--betas`` for it alone."""
    cells = []
    for spec in specs:
        grid = dict(config.params.get(spec.name, {}))
        betas = config.betas if "beta" in spec.params else (math.nan,)  # one cell, not one per β it would ignore
        if "beta" in grid and "beta" in spec.params:
            betas = tuple(_own_beta(spec.name, value) for value in grid.pop("beta"))
        unpaired = spec.unpaired if isinstance(spec, MethodSpec) else spec.cls.unpaired
        for beta, seed, scenario in itertools.product(betas, config.seeds, config.scenarios):
            if desirable_ratio(scenario) and not unpaired:
                continue  # an unpaired scenario has no pairs to train a paired variant on
            for values in itertools.product(*grid.values()):
                params = {**dict(zip(grid, values, strict=True)), **({"beta": beta} if "beta" in spec.params else {})}
                built = spec.build(**params)  # parameters validated before anything trains
                beta_or_none = beta if "beta" in spec.params else math.nan
                if isinstance(built, Method):
                    cells.append(Cell(spec, built.loss, beta_or_none, seed, scenario, method=built))
                else:
                    cells.append(Cell(spec, built, beta_or_none, seed, scenario))
    return cells


def _own_beta(variant: str, value: object) -> float:
    try:
        beta = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0") from None
    if not beta > 0:
        raise SweepError(f"--param {variant}.beta={value!r}: β must be a number > 0")
    return beta


def check_sources(config: SweepConfig, out: Path) -> None:
    """Fail at once, before the slow work, for an unwritable ``out``, a ``--model`` that names nothing, a missing
    data file, or a store that cannot be used."""
    check_writable(out)
    check_model_source(config.model)
    if config.data:
        require_pairs_file(Path(config.data), config.split)
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
        model_path = resolve_model(config.model, progress)  # a named or GGUF model is converted once, then cached
    reference, tokenizer = load_model(model_path, device="cpu")
    policy = copy.deepcopy(reference)  # the same weights, without reading the files a second time
    lora_parameters = None
    if config.lora.enabled:
        from dpobench.lora import add_adapters

        lora_parameters = trainable, total = add_adapters(policy, config.lora)
        progress(f"LoRA rank {config.lora.rank} on {','.join(config.lora.targets)}: {trainable / 1e6:.2f} M of "
                 f"{total / 1e6:.1f} M parameters train; the reference is the base model")  # fmt: skip
    reference_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}  # where every cell starts
    try:
        acceleration = plan_acceleration(config.speed, device, reference)
    except ValueError as error:
        raise SweepError(str(error)) from None
    reference.to(device)
    model_hash = model_fingerprint(model_path)
    try:
        judge = load_judge(config.judge, device) if config.judge else None
    except JudgeError as error:
        raise SweepError(str(error)) from None
    data = _task_data(config, reference, tokenizer, device, model_hash, progress, judge)
    data_hash = data.fingerprint() + _evaluation_size(config)
    plan = _cells_with_their_inputs(plan, data, progress)
    ref_key, cache, autocast = f"{model_hash}|{data_hash}", cache_root(), acceleration.autocast
    pad_id = tokenizer.pad_token_id
    # per token only where a variant of the sweep reads them: they cost a (pairs, longest completion) table
    per_token = any(TOKEN_LOGPS in cell.inputs for cell in plan.cells if cell.method is None)
    train_ref, heldout_ref = (
        cached_reference_logprobs(reference, part.pairs, pad_id, f"{ref_key}|{name}", cache, device=device,
                                  autocast=autocast, token_logps=per_token)
        for name, part in (("train", data.train), ("heldout", data.heldout))
    )  # fmt: skip
    trains = {
        s: apply_scenario(data.train, s, noise=config.noise, length_bonus=config.length_bonus) for s in config.scenarios
    }
    # unpaired variants train on examples: the data's own, or a scenario's pairs unrolled; thinned to an unpaired
    # scenario's ratio
    examples = {s: scenario_examples(data, trains[s], s)
                for s in sorted({c.scenario for c in plan.cells if c.unpaired})}  # fmt: skip
    example_reference = {
        s: cached_example_reference(reference, part, pad_id, cache, key=model_hash, device=device, autocast=autocast)
        for s, part in examples.items()
    }  # fmt: skip
    # the RLHF methods' learned reward, one per scenario they train in: its pairs are that scenario's
    reward_models = {
        s: _reward_model(model_path, pad_id, trains[s], data, s, model_hash, device, progress)
        for s in sorted({c.scenario for c in plan.cells if c.method is not None and c.method.uses_reward_model})
    }  # fmt: skip
    return Prepared(
        plan=plan, reference=reference, policy=policy, reference_state=reference_state, tokenizer=tokenizer,
        data=data, trains=trains, train_reference=train_ref, examples=examples, example_reference=example_reference,
        evaluator=Evaluator(reference, tokenizer, data, heldout_ref, device=device, autocast=autocast, judge=judge),
        judge=judge, lora_parameters=lora_parameters, reward_models=reward_models, sft_seconds=_sft_seconds(model_path),
        acceleration=acceleration, model_hash=model_hash, data_hash=data_hash,
        # the batch layout and CUDA graphs are not part of a cell's identity: the same log-probs within float
        # rounding (tests/test_logprobs.py; within bf16 rounding on an H200), so a store resumes either way
        train_json={**asdict(config.train), "compile": acceleration.compile,
                    **({"lora": config.lora.label()} if config.lora.enabled else {})},
    )  # fmt: skip


def _reward_model(
    model_path: str | Path, pad_id: int, train: PairSet, data: TaskData, scenario: str, model_hash: str, device: str,
    progress: Callable[[str], None],
) -> RewardModel:  # fmt: skip
    """The reward model learned from ``scenario``'s training pairs (cached), and one line on how well it learned."""
    reward_model = cached_reward_model(model_path, pad_id, train, data.heldout, RewardRecipe(), key=model_hash,
                                       cache_dir=cache_root(), device=device, progress=progress)  # fmt: skip
    info = reward_model.info
    agreement = (
        ""
        if math.isnan(info["gold_agreement"])
        else f", rank agreement with the gold reward ρ = {info['gold_agreement']:.2f}"
    )
    verdict = ("" if reward_model.learned else f"; it did not learn the preferences (≤ {LEARNED_ABOVE}): the methods "
               "trained against it are marked failed, not trained")  # fmt: skip
    progress(f"reward model ({scenario} pairs): held-out accuracy {info['heldout_accuracy']:.2f}{agreement}{verdict}")
    return reward_model


def _sft_seconds(model_path: str | Path) -> float | None:
    """How long the SFT reference model took to train, as its cache entry recorded it (None for a model dpobench did
    not train)."""
    try:
        log = json.loads((Path(model_path) / "recipe.json").read_text())["log"]
        return float(next(entry["seconds"] for entry in log if "seconds" in entry))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def _evaluation_size(config: SweepConfig) -> str:
    """The number of sampled evaluation prompts, where it is not the default: the pairs' fingerprints do not hold it
    (the training and held-out prompts are drawn first), and cells evaluated on other prompts are other cells. Empty
    at the default, so that the cells of earlier runs keep their identities."""
    count = config.data_recipe.eval_prompts
    return "" if config.data or count == DataRecipe().eval_prompts else f"|eval_prompts={count}"


def _cells_with_their_inputs(plan: SweepPlan, data: TaskData, progress: Callable[[str], None]) -> SweepPlan:
    """The plan less the cells whose inputs this sweep cannot give: variants that read the pairs' score margins where
    the data has none, and a moving reference under LoRA (mixing adapters' factors is not mixing their weights; TRL
    refuses it too). A variant named with ``--variants`` is refused instead, before any cell trains."""
    config = plan.config
    margins = data.info.get("margin_problem") or "these pairs have none"
    reasons = {
        "margin": (any(math.isnan(p.margin) for p in (*data.train.pairs, *data.heldout.pairs)),
                   f"reads each pair's score margin, and {margins} (give every row of {config.data} a `margin`, or "
                   "`score_chosen` and `score_rejected`)"),
        MOVING_REFERENCE: (config.lora.enabled, "moves its reference toward the policy, which LoRA adapters cannot "
                           "do by mixing their factors; run it without --lora"),
    }  # fmt: skip
    left_out: dict[str, str] = {}
    for cell in plan.cells:
        for name, (missing, why) in reasons.items():
            if missing and name in cell.inputs:
                left_out.setdefault(cell.spec.name, why)
        if cell.hparams.get("labeller") == "gold" and cell.method is not None and not (data.has_gold or config.judge):
            left_out.setdefault(cell.spec.name, "labels its pairs with the gold reward, and these pairs have none "
                                "(give a judge with --judge, or --param NAME.labeller=reward_model)")  # fmt: skip
    paired: list[str] = []  # a file of unpaired rows has no pairs for a paired variant: left out in one line
    if data.examples is not None:
        paired = sorted({cell.spec.name for cell in plan.cells if not cell.unpaired})
        unpaired = sorted({cell.spec.name for cell in plan.cells if cell.unpaired})
        why = f"trains on pairs, and {config.data} holds unpaired rows (prompt, completion, label)"
        if paired and (config.variants or not unpaired):
            known = ", ".join(n for n, spec in get_losses().items() if spec.cls.unpaired)
            raise SweepError(f"{paired[0]} {why}; train an unpaired variant on it ({known})")
        if paired:
            progress(f"{len(paired)} paired variants left out: {config.data} holds unpaired rows, which only "
                     f"unpaired variants ({', '.join(unpaired)}) train on")  # fmt: skip
            left_out.update(dict.fromkeys(paired, why))
    if not left_out:
        return plan
    for variant, why in left_out.items():
        if variant in paired:
            continue  # said above, all together
        if config.variants:
            raise SweepError(f"{variant} {why}; or drop it from --variants")
        progress(f"{variant} left out: it {why}")
    return replace(plan, cells=[cell for cell in plan.cells if cell.spec.name not in left_out])


def _task_data(
    config: SweepConfig, reference: Any, tokenizer: Any, device: str, model_hash: str, progress: Callable,
    judge: Judge | None,
) -> TaskData:  # fmt: skip
    """The user's pairs (``--data``), or the task's: its prompts, two samples of the reference model for each,
    labelled by the task's grammar-and-lexicon gold reward, or by ``judge`` where one is given."""
    if config.data:
        max_length = getattr(reference.config, "max_position_embeddings", 512) or 512
        data = load_pairs_file(config.data, tokenizer, max_length=min(max_length, 1024), split=config.split)
    else:
        if config.data_recipe.chat and not getattr(tokenizer, "chat_template", None):
            raise SweepError(f"--chat-prompts: the tokenizer of --model {config.model} has no chat template; give an "
                             "instruct (chat) model, or drop --chat-prompts")  # fmt: skip
        data = cached_task_data(reference, tokenizer, config.data_recipe, model_fingerprint=model_hash,
                                cache_dir=cache_root(), device=device, progress=progress, labeller=judge)  # fmt: skip
    cut = data.train.truncated
    if data.examples is not None:
        progress(f"{len(data.examples.examples)} training examples ({data.info['desirable']} desirable, "
                 f"{data.info['undesirable']} undesirable), {len(data.eval_prompts)} held-out prompts"
                 + (f"; {cut} completion{'s' * (cut != 1)} cut to the model's length (EOS kept)" if cut else ""))  # fmt: skip
        return data
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
    margins = (prepared.data.train.margin_fingerprint(),) if "margin" in cell.inputs and cell.method is None else ()
    return _hash(cell.spec.name, cell.hparams, cell.seed, cell.scenario, prepared.model_hash,
                 prepared.data_hash, prepared.train_json, prepared.plan.device, config.noise, config.length_bonus,
                 *code, *_judged(prepared), *margins, *_rewarded(cell))  # fmt: skip


def reference_cell_id(prepared: Prepared, seed: int) -> str:
    return _hash("reference", seed, prepared.model_hash, prepared.data_hash, prepared.config.train.max_grad_norm,
                 *_judged(prepared))  # fmt: skip


def _judged(prepared: Prepared) -> tuple[str, ...]:
    """A judge's key, part of a cell's identity (its gold reward is the judge's); nothing without one, so that the
    cells of runs without a judge keep their identities."""
    return (prepared.judge.key,) if prepared.judge is not None else ()


def _rewarded(cell: Cell) -> tuple[dict[str, Any], ...]:
    """A method's reward-model recipe, part of its cells' identity; nothing for the losses' cells."""
    return (asdict(RewardRecipe()),) if cell.method is not None and cell.method.uses_reward_model else ()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def executor_for(config: SweepConfig) -> Executor:
    """The executor ``config.executor`` names (Ray's is imported only when asked for)."""
    if config.executor.name == "ray":
        from dpobench.ray_executor import RayExecutor

        return RayExecutor(config.executor)
    return run_in_process


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    command: str = "",
    progress: Callable[[str], None] = print,
    cell_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Run every cell not yet in ``out/results.sqlite`` (on ``executor``, else the one the configuration names);
    return the per-cell summary of this command's cells. A sweep refused before it wrote anything leaves no empty
    ``out`` behind."""
    created = not out.exists()
    try:
        plan = plan_sweep(config)
        check_sources(config, out)
        prepared = prepare(plan, progress)
        store = open_store(out)  # only now: a sweep stopped by bad data or a bad model leaves no store behind
        try:
            ours = _execute(prepared, store, command, progress, cell_progress or Progress(),
                            should_stop or (lambda: False), executor or executor_for(config))  # fmt: skip
        finally:
            store.close()
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finals = cell_finals(read_tidy(out / "results.sqlite"))
    order = {identity: number for number, identity in enumerate(ours)}
    others = int((~finals.cell_id.isin(order)).sum())
    if others:  # the store accumulates runs; this command's summary is its own cells
        progress(f"the store also holds {others} cell{'s' * (others != 1)} of other commands' settings: the report "
                 "compares them all; this summary and summary.csv hold this command's cells")  # fmt: skip
    ours_only = finals[finals.cell_id.isin(order)]  # in the plan's order, whatever order the cells finished in
    return ours_only.sort_values("cell_id", key=lambda ids: ids.map(order), kind="stable").reset_index(drop=True)


def _execute(
    prepared: Prepared, store: Store, command: str, progress: Callable[[str], None], cell_progress: Progress,
    should_stop: Callable[[], bool], executor: Executor,
) -> list[str]:  # fmt: skip
    """Record the run, evaluate the reference, train every cell the store lacks, committing each as it finishes.
    Returns the ids of this command's cells: the references, then the cells in the plan's order."""
    config, plan = prepared.config, prepared.plan
    run_id = _record_run(prepared, store, command)
    base = {"run_id": run_id, "model": str(config.model), "model_hash": prepared.model_hash, "device": plan.device,
            "dtype": prepared.acceleration.dtype}  # fmt: skip
    ours = []
    for seed in config.seeds:  # the reference model's own metrics: where every variant starts (KL 0), per seed
        reference_id = reference_cell_id(prepared, seed)
        ours.append(reference_id)
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
        ours.append(identity)
        if not store.finished(identity):
            todo.append((identity, cell))
    planned = list(zip(ours[len(config.seeds) :], plan.cells, strict=True))
    total = len(plan.cells)
    progress(f"{total} cell{'s' * (total != 1)}, {total - len(todo)} already in the store, {len(todo)} to run")
    if todo:  # after the data and settings checks, so that an error there stays the only line
        for line in prepared.acceleration.describe(config.speed):
            progress(line)
    pending = [Pending(identity, cell, _label(config, cell, number, len(todo)))
               for number, (identity, cell) in enumerate(todo, start=1)]  # fmt: skip
    cell_progress.begin(len(pending))
    committed = 0
    results = executor(prepared, pending, cell_progress, should_stop)
    # a generator is closed on any way out of the loop, so that an executor cancels what it has in flight
    with contextlib.closing(results) if hasattr(results, "close") else contextlib.nullcontext():
        for done in results:
            name, result = done.pending.cell.spec.name, done.result
            if result.status == "interrupted":
                raise SweepInterrupted(
                    f"interrupted in cell {name}; {committed} of {len(todo)} cells of this run finished"
                )
            store.write_cell(_cell_row(prepared, base, done), result.steps, result.evaluations)
            committed += 1
            cell_progress.done(done.pending.label, result.status, result.error, done.finished - done.started)
            if should_stop():  # Ctrl-C after the cell's last step: it is kept, and so is the request to stop (the
                break  # cells left, or the summary and report, wait for a rerun)
    if should_stop():
        raise SweepInterrupted(f"stopped after {committed} of {len(todo)} cells of this run")
    _measure_step_costs(prepared, store, run_id, planned, bool(todo), progress, should_stop)
    return ours


def _measure_step_costs(
    prepared: Prepared, store: Store, run_id: str, planned: list[tuple[str, Cell]], trained: bool,
    progress: Callable[[str], None], should_stop: Callable[[], bool],
) -> None:  # fmt: skip
    """Each configuration's step cost side by side (the cells' own step times are not comparable), where this command
    trained a cell or a configuration has none yet. Only configurations with a finished cell: a loss that failed, or
    killed its worker, is not run again here, in the driver."""
    status = store.cells().set_index("cell_id").status
    # a loss's step: the methods' steps sample and score too (their cells record their own throughput)
    done = [cell for identity, cell in planned if status.get(identity) == "done" and cell.method is None]
    costs = store.step_costs()
    unmeasured = {configuration_key(cell) for cell in done} - set(zip(costs.variant, costs.params, strict=True))
    if trained or unmeasured:
        try:
            times = measure_step_costs(prepared, done, prepared.config.step_cost_rounds, should_stop, progress)
        except Exception as error:  # the cells are committed; a measurement that breaks costs the report one table
            progress(f"step cost not measured: {one_line(error)}")
            times = []
        if times:
            store.write_step_costs(run_id, [asdict(t) for t in times])


def _label(config: SweepConfig, cell: Cell, number: int, total: int) -> str:
    swept = " ".join(f"{k}={v}" for k, v in cell.hparams.items() if k in config.params.get(cell.spec.name, {}))
    beta = "" if math.isnan(cell.beta) else f" β={cell.beta:g}"  # a variant without β shows none, not β=nan
    return f"[{number}/{total}] {cell.spec.name}{beta} seed={cell.seed} {cell.scenario} {swept}".rstrip()


def _cell_row(prepared: Prepared, base: dict[str, Any], done: Finished) -> dict[str, Any]:
    """The store's row of a finished cell: what it trained, on what, and how it ended."""
    cell, result = done.pending.cell, done.result
    return {**base, "cell_id": done.pending.cell_id, "role": "variant", "variant": cell.spec.name,
            "plugin": cell.spec.plugin, "plugin_version": cell.spec.version,
            "params": json.dumps(cell.hparams, sort_keys=True, default=str), "beta": cell.beta, "seed": cell.seed,
            "scenario": cell.scenario, "config": json.dumps(prepared.train_json, sort_keys=True),
            "status": result.status, "error": result.error, "started": done.started, "finished": done.finished,
            "seconds": done.finished - done.started}  # fmt: skip


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
              **({"judge": prepared.judge.describe} if prepared.judge is not None else {}),
              **({"reward_models": {s: m.info for s, m in prepared.reward_models.items()}}
                 if prepared.reward_models else {}),
              **({"lora": {"settings": config.lora.label(), "trainable": prepared.lora_parameters[0],
                           "total": prepared.lora_parameters[1]}} if prepared.lora_parameters else {}),
              "share_prompt": acceleration.share_prompt, "cuda_graphs": config.speed.cuda_graphs, "plugins": plugins,
              # per variant and parameters: an online method holds the reward model or not by its labeller
              "models": sorted({(c.spec.name, json.dumps(c.hparams, sort_keys=True, default=str), c.models)
                                for c in prepared.plan.cells}),
              **({"sft_seconds": prepared.sft_seconds} if prepared.sft_seconds is not None else {})},
    )  # fmt: skip
    return run_id


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
    """The store in ``out``; ``StoreError`` (one line) where it cannot be used."""
    return Store(out / "results.sqlite")


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
