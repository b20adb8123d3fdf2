"""A sweep's cells and where they run: the planned ``Cell``, the ``Prepared`` sweep every cell shares, and the
executors' side of it.

``run_cell`` trains and evaluates one cell, a function of (prepared, cell) alone, so that an executor may run cells
anywhere. An executor (``Executor``) is given the cells the store lacks (``Pending``) and yields each one's
``Finished`` as it finishes; ``run_in_process`` is the default one (one cell at a time, or side by side in forked
workers), ``dpobench.ray_executor`` the second. ``dpobench.sweep`` plans, prepares and commits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dpobench.acceleration import Acceleration
from dpobench.config import SweepConfig, SweepError
from dpobench.data import ExampleSet, PairSet, TaskData
from dpobench.judges import Judge
from dpobench.logprobs import ExampleReference, ReferenceLogps
from dpobench.losses import PreferenceLoss
from dpobench.registry import LossSpec
from dpobench.reward_model import RewardModel
from dpobench.train import CellResult, Evaluator, train_cell

__all__ = ["Cell", "Executor", "Finished", "Pending", "Prepared", "Progress", "SweepPlan", "cells_at_once",
           "run_cell", "run_in_process"]  # fmt: skip


class NamedSpec(Protocol):
    """What a cell needs of its spec, a ``LossSpec`` or a method's (``dpobench.methods.MethodSpec``): its name, and
    whose code it runs."""

    @property
    def name(self) -> str: ...

    @property
    def plugin(self) -> str: ...

    @property
    def version(self) -> str: ...


class CellMethod(Protocol):
    """A method beyond offline losses as a cell holds it (``dpobench.methods.Method``): its parameters, the models it
    holds, whether it trains against the learned reward model, and how it trains the cell."""

    loss: PreferenceLoss | None
    hparams: dict[str, Any]

    @property
    def models(self) -> tuple[str, ...]: ...

    @property
    def uses_reward_model(self) -> bool: ...

    def run(self, prepared: Prepared, cell: Cell, on_step: Callable[[int], None] | None,
            should_stop: Callable[[], bool] | None) -> CellResult: ...  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One configuration to train: a variant with its parameters, β, seed and scenario; or a method
    (``dpobench.methods``: best-of-N, RLOO, PPO, online training of a variant's loss) with its own."""

    spec: LossSpec | NamedSpec
    loss: PreferenceLoss | None  # None for a method that trains no loss of the registry (RLOO, PPO, best-of-N)
    beta: float  # NaN for a variant without β
    seed: int
    scenario: str
    method: CellMethod | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        """The configuration's parameters: the loss's, or the method's (an online method's include its loss's)."""
        return self.method.hparams if self.method is not None else self.loss.hparams  # type: ignore[union-attr]

    @property
    def inputs(self) -> frozenset[str]:
        """What the loss reads beyond the summed log-probs (nothing for a method without one)."""
        return self.loss.inputs if self.loss is not None else frozenset()

    @property
    def models(self) -> tuple[str, ...]:
        """The models the cell holds while it trains: the policy, and the reference unless its loss is
        reference-free, or its method's (PPO's four)."""
        if self.method is not None:
            return self.method.models
        return ("policy",) if self.loss.reference_free else ("policy", "reference")  # type: ignore[union-attr]

    @property
    def unpaired(self) -> bool:
        return self.loss is not None and self.loss.unpaired and self.method is None


@dataclass(frozen=True)
class SweepPlan:
    """A checked configuration and its cells; nothing built yet."""

    config: SweepConfig
    device: str
    cells: list[Cell]


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
    train_reference: ReferenceLogps
    evaluator: Evaluator
    acceleration: Acceleration
    model_hash: str
    data_hash: str
    #: the training settings that are part of every cell's identity (the compile setting as decided)
    train_json: dict[str, Any] = field(default_factory=dict)
    #: what scores the samples where the pairs have no gold reward (``--judge``), or None
    judge: Judge | None = None
    #: with LoRA: (trainable, total) parameters of the policy
    lora_parameters: tuple[int, int] | None = None
    #: per scenario with an unpaired cell: its examples, and the reference's log-probs of them
    examples: dict[str, ExampleSet] = field(default_factory=dict)
    example_reference: dict[str, ExampleReference] = field(default_factory=dict)
    #: per scenario with a method cell that needs one: the reward model learned from its training pairs
    reward_models: dict[str, RewardModel] = field(default_factory=dict)
    #: how long the SFT reference took to train (its cache entry's record), where dpobench trained it
    sft_seconds: float | None = None

    def training(self, cell: Cell) -> tuple[PairSet | ExampleSet, ReferenceLogps | ExampleReference]:
        """What ``cell`` trains on, and the reference's log-probs of it: its scenario's pairs, or, for an unpaired
        variant, its scenario's examples."""
        if cell.unpaired:
            return self.examples[cell.scenario], self.example_reference[cell.scenario]
        return self.trains[cell.scenario], self.train_reference

    @property
    def config(self) -> SweepConfig:
        return self.plan.config


def run_cell(
    prepared: Prepared, cell: Cell, on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CellResult:  # fmt: skip
    """Train and evaluate one cell from the reference weights; a cell too big for the GPU fails alone."""
    evaluator, loss, seed = prepared.evaluator, cell.loss, cell.seed
    try:
        if cell.method is not None:
            return cell.method.run(prepared, cell, on_step, should_stop)
        assert loss is not None
        loss.to(prepared.plan.device)
        return train_cell(
            prepared.policy, prepared.reference_state, loss, *prepared.training(cell), prepared.tokenizer.pad_token_id, prepared.config.train, seed,
            evaluate=lambda model, step: evaluator(model, step, loss, seed), on_step=on_step, should_stop=should_stop,
            acceleration=prepared.acceleration, reference_model=prepared.reference,
        )  # fmt: skip
    except torch.cuda.OutOfMemoryError as error:
        return CellResult(status="failed", error=f"CUDA out of memory: {str(error).splitlines()[0]}")


@dataclass(frozen=True)
class Pending:
    """A cell the store lacks, as an executor is given it: its identity, the cell, and its progress label."""

    cell_id: str
    cell: Cell
    label: str


@dataclass(frozen=True)
class Finished:
    """A cell an executor ran: what ``run_cell`` returned, and when it started and finished (``time.time()``)."""

    pending: Pending
    result: CellResult
    started: float
    finished: float


class Progress:
    """What a sweep reports as it goes; each method does nothing here, and a display overrides what it shows.

    The driver calls ``begin`` with the number of cells to run and ``done`` as each is committed (with the seconds
    it took); an executor calls ``start`` / ``advance`` for the one cell it trains in this process (its steps), or
    ``running`` with how many cells it has in flight, and whether ``here``, in this process (side by side: a stop
    request lets them finish their step), or elsewhere (a worker drops them)."""

    def begin(self, cells: int) -> None: ...

    def start(self, label: str, steps: int) -> None: ...

    def advance(self, step: int) -> None: ...

    def running(self, cells: int, here: bool = False) -> None: ...

    def done(self, label: str, status: str, error: str = "", seconds: float = math.nan) -> None: ...


#: where cells run: given the prepared sweep, the cells to run, a ``Progress`` and a stop request, it yields each
#: cell's ``Finished`` as it finishes, in any order, and after a stop request yields no more. The driver commits
#: each as it arrives and stays the store's only writer
Executor = Callable[[Prepared, list[Pending], Progress, Callable[[], bool]], Iterator[Finished]]


#: side by side, cells train in forked worker processes: Linux (elsewhere one at a time)
_CAN_FORK = hasattr(os, "sched_getaffinity") and "fork" in multiprocessing.get_all_start_methods()

#: below this many trainable parameters, cells train side by side by default: the default run's 46 `tiny` cells
#: took 0.71x the wall time of one at a time on 2 cores, where torch's two threads gave one `tiny` step only 1.0-1.6x
#: over one thread (benchmarks/RESULTS.md). Larger models, whose step uses the cores better and whose copies cost more
#: memory, were not measured side by side at the sweep's scale: they train one at a time unless asked
SIDE_BY_SIDE_BELOW = 1_000_000

#: and cells of at least this many steps: forking the workers costs about a second a sweep, which short cells do not
#: win back (4 `tiny` cells of 4 steps: 9.6-13.4 s side by side against 8.6-10.5 s one at a time; of 50 steps:
#: 13.7-15.6 s against 14.4-16.8 s)
SIDE_BY_SIDE_MIN_STEPS = 50


def cells_at_once(prepared: Prepared) -> int:
    """How many cells ``run_in_process`` trains at the same time: ``--parallel-cells``, or by default (0) one per
    core this process may use where a cell's step cannot use them all (an eager CPU step of a model below
    ``SIDE_BY_SIDE_BELOW`` trainable parameters) and its cells are long enough to pay for the workers
    (``SIDE_BY_SIDE_MIN_STEPS``), else 1."""
    asked = prepared.config.executor.parallel_cells
    if asked:
        return asked
    trainable = sum(p.numel() for p in prepared.policy.parameters() if p.requires_grad)
    small = trainable < SIDE_BY_SIDE_BELOW and prepared.plan.device == "cpu" and not prepared.acceleration.compile
    long = prepared.config.train.steps >= SIDE_BY_SIDE_MIN_STEPS
    return len(os.sched_getaffinity(0)) if small and long and _CAN_FORK else 1


def run_in_process(
    prepared: Prepared, pending: list[Pending], progress: Progress, should_stop: Callable[[], bool]
) -> Iterator[Finished]:
    """The default executor: each cell in turn in this process, or ``cells_at_once`` side by side."""
    at_once = min(cells_at_once(prepared), len(pending))
    if at_once > 1:
        yield from _side_by_side(prepared, pending, progress, should_stop, at_once)
        return
    for item in pending:
        if should_stop():
            return
        progress.start(item.label, prepared.config.train.steps)
        started = time.time()
        result = run_cell(prepared, item.cell, progress.advance, should_stop)
        yield Finished(item, result, started, time.time())


#: prctl(2)'s option that has the kernel send a signal to a process when its parent dies
PR_SET_PDEATHSIG = 1

#: the sweep that side-by-side workers train from: set just before they fork, so that each inherits it (only a
#: cell's number goes to a worker, and its result back)
_FORKED: tuple[Prepared, list[Pending], Any] | None = None


def _side_by_side(
    prepared: Prepared, pending: list[Pending], progress: Progress, should_stop: Callable[[], bool], at_once: int
) -> Iterator[Finished]:
    """``at_once`` cells at a time, each in a worker process forked from this one (so it has the prepared sweep, its
    own copy of the policy and its own interpreter: Python threads would wait on each other's interpreter lock) on
    one torch thread, so that a cell's numbers do not depend on what trains beside it. Each is yielded as it
    finishes. A stop request reaches the workers, whose cells stop after their step; leaving early stops them too."""
    global _FORKED
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    _FORKED = (prepared, pending, stop)
    pool = concurrent.futures.ProcessPoolExecutor(at_once, mp_context=context, initializer=_start_worker)
    try:
        in_flight = {pool.submit(_train_forked, number): item for number, item in enumerate(pending)}
        progress.running(min(at_once, len(in_flight)), here=True)
        while in_flight:
            if should_stop():
                stop.set()
            done, _ = concurrent.futures.wait(in_flight, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                item = in_flight.pop(future)
                progress.running(min(at_once, len(in_flight)), here=True)
                try:
                    result, started, finished = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise SweepError(f"the worker process training {item.label} died (out of memory?); finished cells "
                                     "are in the store: rerun the same command, with --parallel-cells 1 to train "
                                     "one cell at a time") from None  # fmt: skip
                yield Finished(item, result, started, finished)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        _FORKED = None


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it asks the cells to stop after their step
    with contextlib.suppress(OSError, AttributeError):  # a driver killed outright takes its workers with it (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's own threads, after a fork: its advice


def _train_forked(number: int) -> tuple[CellResult, float, float]:
    assert _FORKED is not None  # inherited from the driver
    prepared, pending, stop = _FORKED
    started = time.time()
    return run_cell(prepared, pending[number].cell, should_stop=stop.is_set), started, time.time()
