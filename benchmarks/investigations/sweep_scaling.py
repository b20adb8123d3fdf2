"""How a sweep's time grows with its number of cells: one tokenisation/sampling pass and one reference pass,
then one policy-only training run per cell.

    python benchmarks/investigations/sweep_scaling.py [--cells 1,4,16] [--steps 150]

Each sweep starts with an empty reference-log-prob cache, a fresh output directory and the SFT model
cached, on the tiny model on the CPU. Prints setup time (model load, pair sampling, reference pass),
total time and seconds per cell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dpobench.config import SweepConfig, TrainConfig
from dpobench.models import cache_root
from dpobench.sweep import Progress, run_sweep

VARIANTS = ("dpo", "ipo", "simpo", "hinge", "cpo", "robust_dpo", "cdpo", "sppo_hard", "nca_pair", "bco_pair",
            "apo_zero", "discopop", "orpo", "len_reg_dpo", "dpop", "cal_dpo")  # fmt: skip


class Clock(Progress):
    def __init__(self) -> None:
        self.first_cell: float | None = None
        self.cells: list[float] = []
        self._start = 0.0

    def start(self, label: str, total: int) -> None:
        self._start = time.perf_counter()
        self.first_cell = self.first_cell or self._start

    def advance(self, step: int) -> None:
        pass

    def done(self, label: str, status: str, error: str = "") -> None:
        self.cells.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", default="1,4,16")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    models = cache_root() / "models"
    print("| cells | setup s (load, sample pairs, reference pass) | cells s | s per cell | total s |")
    print("|---|---|---|---|---|")
    for n in [int(c) for c in args.cells.split(",")]:
        scratch = Path(tempfile.mkdtemp(prefix="dpobench-scaling-"))
        (scratch / "cache").mkdir()
        os.symlink(models, scratch / "cache" / "models")  # the SFT model stays cached; the reference cache is empty
        os.environ["DPOBENCH_CACHE"] = str(scratch / "cache")
        clock = Clock()
        start = time.perf_counter()
        config = SweepConfig(variants=VARIANTS[:n], device="cpu", train=TrainConfig(steps=args.steps))
        run_sweep(config, scratch / "out", progress=lambda m: None, cell_progress=clock)
        total = time.perf_counter() - start
        setup = (clock.first_cell or start) - start
        cells = sum(clock.cells)
        print(f"| {n} | {setup:.1f} | {cells:.1f} | {cells / n:.2f} | {total:.1f} |", flush=True)
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
