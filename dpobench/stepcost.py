"""What each loss costs per training step, measured side by side.

A sweep's own step times are taken one cell after another: on a shared machine the load changes between cells, and
two cells of the same cost can differ several-fold. Here every configuration trains on the same trainer (one for the
paired variants, one for the unpaired ones, whose batch is as many completions), the same fixed batch, from the same
weights, in interleaved rounds (each round runs every configuration once, in a rotated order); a configuration's cost in a round is its step time over the median of that round, so that what the machine
does between rounds cancels. ``tables.step_cost_table`` turns the rounds into ratios with their spread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dpobench.train import CellStopped, CellTrainer

if TYPE_CHECKING:
    from dpobench.cells import Cell, Prepared

__all__ = ["WARMUP_ROUNDS", "StepTime", "configuration_key", "measure_step_costs"]

#: rounds run before the measured ones: the first steps allocate, and on CUDA compile and capture
WARMUP_ROUNDS = 2


@dataclass(frozen=True)
class StepTime:
    """One configuration's step time in one measured round."""

    variant: str
    params: str  # its parameters but β (β does not change what a step computes), as JSON
    round: int
    step_time_ms: float


def configuration_key(cell: Cell) -> tuple[str, str]:
    """The configuration a cell's step cost is measured for: its variant and its parameters but β."""
    params = {k: v for k, v in cell.hparams.items() if k != "beta"}
    return cell.spec.name, json.dumps(params, sort_keys=True, default=str)


def measure_step_costs(
    prepared: Prepared, cells: list[Cell], rounds: int, should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[str], None] = print,
) -> list[StepTime]:  # fmt: skip
    """Each configuration of ``cells`` timed on one trainer and one batch (per kind of data), ``rounds`` interleaved
    rounds after ``WARMUP_ROUNDS``; each round starts from the reference weights. A configuration whose loss fails on the batch is
    left out (its cells say why). Returns nothing if stopped, or if there is nothing to compare."""
    losses = {}
    for cell in cells:
        losses.setdefault(configuration_key(cell), cell.loss)
    if rounds < 1 or len(losses) < 2:
        return []
    device = prepared.plan.device
    # one trainer per kind of data (pairs, and unpaired examples for unpaired variants), on the same weights; the
    # unpaired one on the first cell's scenario unrolled, its batches as many completions as a paired one's
    trainers: dict[bool, CellTrainer] = {}
    for cell in cells:
        if cell.loss.unpaired not in trainers:
            trainers[cell.loss.unpaired] = CellTrainer(
                prepared.policy, prepared.reference_state, cell.loss, *prepared.training(cell),
                prepared.tokenizer.pad_token_id, prepared.config.train, cell.seed, prepared.acceleration,
                prepared.reference,
            )  # fmt: skip
    keys, failed, times = list(losses), set(), []
    started = time.perf_counter()
    for number in range(WARMUP_ROUNDS + rounds):
        if should_stop():
            return []
        prepared.policy.load_state_dict(prepared.reference_state)  # no loss is timed on weights another one bent
        turn = number % len(keys)
        for key in keys[turn:] + keys[:turn]:  # rotated: no configuration always runs first after the reload
            if key in failed:
                continue
            loss = losses[key].to(device)
            trainer = trainers[loss.unpaired]
            trainer.use_loss(loss)
            try:
                step = trainer.step(trainer.order[0])
            except (CellStopped, torch.OutOfMemoryError):
                failed.add(key)
                continue
            if number >= WARMUP_ROUNDS:
                times.append(StepTime(key[0], key[1], number - WARMUP_ROUNDS, step["step_time_ms"]))
    progress(f"step cost: {len(keys) - len(failed)} configurations side by side on one batch, {rounds} rounds "
             f"({time.perf_counter() - started:.1f} s)")  # fmt: skip
    return [t for t in times if (t.variant, t.params) not in failed]
