"""A 200-cell sweep on the tiny model with the process's resident memory recorded after every cell.

    python benchmarks/investigations/long_sweep_memory.py [--cells 200] [--steps 20] [--out DIR]

Prints RSS at the start (after setup) and the end, and the slope of a least-squares line through the
per-cell readings (MB per cell). Flat memory means no growth per cell. Uses the default SFT model cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import dpobench
from dpobench.config import SweepConfig, TrainConfig
from dpobench.sweep import Progress, run_sweep


def rss_mb() -> float:
    """Current resident set size (not the peak), from /proc."""
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Recorder(Progress):
    """Plays the sweep's progress hooks and samples RSS after every cell."""

    def __init__(self) -> None:
        self.readings: list[tuple[float, float]] = []

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def done(self, label: str, status: str, error: str = "", seconds: float = math.nan) -> None:
        self.readings.append((time.perf_counter(), rss_mb()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = list(dpobench.get_losses())[: args.cells]  # every variant, at as many β values as the cells need
    betas_needed = -(-args.cells // len(names))
    betas = tuple(round(0.02 * (i + 1), 3) for i in range(betas_needed))
    out = args.out or Path(tempfile.mkdtemp(prefix="dpobench-long-"))
    recorder = Recorder()
    config = SweepConfig(variants=tuple(names), betas=betas, device="cpu", train=TrainConfig(steps=args.steps))
    start = time.perf_counter()
    summary = run_sweep(config, out, progress=lambda m: None, cell_progress=recorder)
    readings = recorder.readings
    xs = list(range(len(readings)))
    ys = [r for _, r in readings]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    result = {
        "cells": len(readings), "steps_per_cell": args.steps, "seconds": round(time.perf_counter() - start, 1),
        "rss_after_first_cell_mb": round(ys[0], 1), "rss_after_cell_10_mb": round(ys[min(9, len(ys) - 1)], 1),
        "rss_at_end_mb": round(ys[-1], 1), "rss_max_mb": round(max(ys), 1), "slope_mb_per_cell": round(slope, 4),
        "failed_cells": int((summary.status != "done").sum()),
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
