"""How a sweep's time grows with its number of cells: one tokenisation/sampling pass and one reference pass,
then one policy-only training run per cell.

    python benchmarks/investigations/sweep_scaling.py [--cells 1,4,16] [--steps 150]

Each sweep starts with an empty reference-log-prob cache, a fresh output directory and the SFT model
cached, on the tiny model on the CPU. Prints setup time (model load, pair sampling, reference pass),
total time and seconds per cell.
"""

from __future__ import annotations

import argparse
import math
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
    """When the cells began, and when the last one was committed (cells may train side by side)."""

    def __init__(self) -> None:
        self.first_cell: float | None = None
        self.last_cell = 0.0

    def begin(self, cells: int) -> None:
        self.first_cell = time.perf_counter()

    def done(self, label: str, status: str, error: str = "", seconds: float = math.nan) -> None:
        self.last_cell = time.perf_counter()


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
        cells = clock.last_cell - (clock.first_cell or start)
        print(f"| {n} | {setup:.1f} | {cells:.1f} | {cells / n:.2f} | {total:.1f} |", flush=True)
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
