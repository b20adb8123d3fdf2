"""Host time of forming one batch: ``collate`` (one row per sequence) against ``collate_shared`` (one row per pair,
the prompt once), and of building the shared rows' mask from their segment ids, on the CPU. Mean of 20 calls after
one warm-up.

    python benchmarks/collate_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.steps import random_pairs, task_pairs
from dpobench.logprobs import collate, collate_shared, pair_rows


def mean_ms(call, calls: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    print("| batch | collate ms | collate_shared ms | its mask, built on the CPU, ms |\n|---|---|---|---|")
    for label, pairs in (("32 pairs of 256 + 127 random tokens", random_pairs(32, 256, 127, 49152)),
                         ("32 of the task's pairs", task_pairs()[0][:32])):  # fmt: skip
        shared = collate_shared(pairs, 0)
        print(
            f"| {label} | {mean_ms(lambda p=pairs: collate(pair_rows(p), 0)):.2f} "
            f"| {mean_ms(lambda p=pairs: collate_shared(p, 0)):.2f} | {mean_ms(lambda b=shared: b.causal_mask):.2f} |"
        )


if __name__ == "__main__":
    main()
