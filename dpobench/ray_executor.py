"""Cells as Ray tasks: a sweep fanned out over the cores of one machine or the nodes of a cluster.

The only module that imports Ray. ``RayExecutor`` is an ``Executor`` (see ``dpobench.sweep``): the driver prepares
the sweep once, puts it in Ray's object store, submits one task per cell with its resources declared (CPU threads,
a share of a GPU), and yields each cell's ``Finished`` as it arrives, in any order; the driver commits it and stays
the store's only writer. A worker reads the prepared sweep once, and keeps it for every cell it runs after.

Faults stay with their cell: a task that raises is a failed cell with its one-line reason; a worker that dies is
retried once by Ray, then recorded as failed. A stop request cancels what has not finished.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch

from dpobench.cells import Finished, Pending, Prepared, Progress, run_cell
from dpobench.config import ExecutorOptions, SweepError
from dpobench.train import CellResult

__all__ = ["RayExecutor"]

#: how long the driver waits for a cell before it looks at the stop request again, seconds
POLL_SECONDS = 0.2

#: the prepared sweep a worker process has read, by its object id: read once, kept for the next cells
_prepared_here: dict[str, Prepared] = {}


class RayExecutor:
    """Runs each cell as a Ray task, on a local Ray it starts (and stops) or on the cluster at ``ray_address``."""

    def __init__(self, options: ExecutorOptions) -> None:
        self.options = options

    def __call__(
        self, prepared: Prepared, pending: list[Pending], progress: Progress, should_stop: Callable[[], bool]
    ) -> Iterator[Finished]:
        if not pending:  # a rerun with every cell in the store starts no Ray
            return
        started_here = self._connect()
        in_flight: dict[Any, Pending] = {}
        try:
            resources = self._resources(prepared.plan.device)
            self._check_feasible(resources)
            _pickle_loose_plugins_by_value(pending)
            shared = ray.put(prepared)
            task = _train.options(**resources, max_retries=1, retry_exceptions=False)
            # the object ref inside a list: Ray hands the task the ref itself, and the worker reads it only once
            in_flight = {task.remote([shared], item, self.options.threads_per_cell): item for item in pending}
            submitted = time.time()
            progress.running(len(in_flight))
            while in_flight and not should_stop():
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    item = in_flight.pop(ref)
                    progress.running(len(in_flight))
                    yield _collect(ref, item, submitted)
                    if should_stop():
                        return
        finally:
            for ref in in_flight:  # a stop request, an error or Ctrl-C twice: what has not finished is cancelled
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def _connect(self) -> bool:
        """Join the cluster at ``ray_address``, or start a local Ray; True where this call started it."""
        if ray.is_initialized():
            return False
        try:
            # "local": a new Ray on this machine, even where RAY_ADDRESS names a cluster. Ray's own notices (its
            # token, the node's address) are left out of the sweep's output; its errors are not
            ray.init(address=self.options.ray_address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=True)  # fmt: skip
        except (ConnectionError, RuntimeError) as error:
            hint = ("; a cluster started with `ray start` wants RAY_AUTH_MODE=token in this shell"
                    if "auth" in str(error).lower() or self.options.ray_address else "")  # fmt: skip
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SweepError(f"--executor ray: Ray did not start or connect ({first}){hint}") from None
        return self.options.ray_address is None

    def _resources(self, device: str) -> dict[str, float]:
        gpu = 1.0 / self.options.cells_per_gpu if device.startswith("cuda") else 0.0
        return {"num_cpus": self.options.threads_per_cell, "num_gpus": gpu}

    def _check_feasible(self, resources: dict[str, float]) -> None:
        """A cell asking for more than any Ray node has would wait forever, silently: refuse it at once."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0) >= resources["num_cpus"] and n.get("GPU", 0) >= resources["num_gpus"] for n in nodes):
            return
        most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
        asked = f"{resources['num_cpus']:g} CPUs" + (
            f" and {resources['num_gpus']:g} GPU" if resources["num_gpus"] else ""
        )
        raise SweepError(f"--threads-per-cell {self.options.threads_per_cell}: each cell asks Ray for {asked}, and no "
                         f"node of the Ray cluster has that (the largest has {most_cpus:g} CPUs); ask for fewer")  # fmt: skip


@ray.remote
def _train(shared: list[Any], item: Pending, threads: int) -> Finished:
    """One cell on a worker, with the thread count it asked Ray for."""
    (ref,) = shared
    key = ref.hex()
    if key not in _prepared_here:
        _prepared_here.clear()  # another sweep's: one at a time
        _prepared_here[key] = ray.get(ref)
    torch.set_num_threads(threads)
    started = time.time()
    result = run_cell(_prepared_here[key], item.cell)
    return Finished(item, result, started, time.time())


def _collect(ref: Any, item: Pending, submitted: float) -> Finished:
    """The task's ``Finished``; a task that raised, or whose worker died twice, as a failed cell with the reason."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        reason = _one_line(error.cause if error.cause is not None else error)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as error:  # killed, twice
        reason = f"the Ray worker running it died, and again when Ray retried it ({type(error).__name__})"
    except ray.exceptions.RayError as error:  # a lost object, a node gone, …
        reason = _one_line(error)
    # when it started is not known here: ``submitted`` includes its wait in Ray's queue
    return Finished(item, CellResult(status="failed", error=reason), submitted, time.time())


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _pickle_loose_plugins_by_value(pending: list[Pending]) -> None:
    """A plugin loaded from a loose file (``--plugins-dir``) is no module a worker could import: its code travels
    with the cell instead."""
    for item in pending:
        if item.cell.loss is None:
            continue  # a method of dpobench's own
        module = sys.modules.get(type(item.cell.loss).__module__)
        if module is not None and module.__name__.startswith("dpobench_local_plugins."):
            ray.cloudpickle.register_pickle_by_value(module)
