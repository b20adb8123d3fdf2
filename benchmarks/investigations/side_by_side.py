"""Two cells side by side on one thread each, against one cell at a time on every thread: the training step's
throughput, the two in turn in one process (the measurement behind ``dpobench.cells.SIDE_BY_SIDE_BELOW``).

Each round times ``--steps`` steps of two ``CellTrainer`` s (the synthetic task's pairs, the default recipe): one
after the other on torch's default threads, then both at once on two Python threads with one torch thread each,
then one after the other on one thread. Prints ms per step (wall time over both cells' steps) and the ratios.

    python benchmarks/investigations/side_by_side.py --size tiny --steps 60
    python benchmarks/investigations/side_by_side.py --size small --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import DpobenchStep, build_model, task_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pairs, vocab, pad = task_pairs()
    steps = [DpobenchStep(build_model(args.size, vocab, seed=i), pairs, 32, "cpu", pad) for i in range(2)]
    default_threads = torch.get_num_threads()

    def run(step: DpobenchStep) -> None:
        for _ in range(args.steps):
            step()

    def in_turn(threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for step in steps:
            run(step)
        return time.perf_counter() - start

    def side_by_side() -> float:
        torch.set_num_threads(1)
        workers = [threading.Thread(target=run, args=(step,)) for step in steps]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - start

    for step in steps:  # warm-up
        for _ in range(5):
            step()
    per_step = lambda seconds: seconds / (2 * args.steps) * 1e3  # noqa: E731
    print(f"{args.size}, 32 pairs a step, {default_threads} threads by default, {args.steps} steps per cell")
    print("| round | in turn, all threads, ms/step | side by side, 1 thread each | in turn, 1 thread | "
          "side by side speed-up | all threads over 1 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    gains, threads_gains = [], []
    for round_ in range(1, args.rounds + 1):
        wide, side, narrow = in_turn(default_threads), side_by_side(), in_turn(1)
        gains.append(wide / side)
        threads_gains.append(narrow / wide)
        print(f"| {round_} | {per_step(wide):.1f} | {per_step(side):.1f} | {per_step(narrow):.1f} | "
              f"{wide / side:.2f} | {narrow / wide:.2f} |")  # fmt: skip
    print(f"| median | | | | {statistics.median(gains):.2f} | {statistics.median(threads_gains):.2f} |")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
