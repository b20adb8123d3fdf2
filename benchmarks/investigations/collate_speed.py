"""Host time of forming one batch: ``collate`` (one row per sequence) against ``collate_shared`` (one row per pair,
the prompt once), and of building the shared rows' mask from their segment ids, on the CPU; then the padded token
ids alone, by ``_pad_rows`` (numpy) against ``torch.tensor`` of nested lists (one Python list per row). Mean of 20
calls after one warm-up.

    python benchmarks/investigations/collate_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch

from benchmarks.steps import random_pairs, task_pairs
from dpobench.logprobs import _pad_rows, collate, collate_shared, pair_rows


def nested_lists(rows, width: int, pad_id: int) -> torch.Tensor:
    """The padded ids as ``torch.tensor`` of one Python list per row, to check and time ``_pad_rows`` against."""
    return torch.tensor([[*p, *c, *([pad_id] * (width - len(p) - len(c)))] for p, c in rows], dtype=torch.long)


def mean_ms(call, calls: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    print("| batch | collate ms | collate_shared ms | its mask, built on the CPU, ms | ids by _pad_rows ms | ids by "
          "torch.tensor of lists ms |\n|---|---|---|---|---|---|")  # fmt: skip
    for label, pairs in (("32 pairs of 256 + 127 random tokens", random_pairs(32, 256, 127, 49152)),
                         ("32 of the task's pairs", task_pairs()[0][:32])):  # fmt: skip
        shared, rows = collate_shared(pairs, 0), pair_rows(pairs)
        lengths = torch.tensor([len(p) + len(c) for p, c in rows])
        width = int(lengths.max())
        assert torch.equal(_pad_rows(rows, lengths, width, 0), nested_lists(rows, width, 0))
        print(
            f"| {label} | {mean_ms(lambda r=rows: collate(r, 0)):.2f} "
            f"| {mean_ms(lambda p=pairs: collate_shared(p, 0)):.2f} | {mean_ms(lambda b=shared: b.causal_mask):.2f} "
            f"| {mean_ms(lambda r=rows, n=lengths, w=width: _pad_rows(r, n, w, 0)):.2f} "
            f"| {mean_ms(lambda r=rows, w=width: nested_lists(r, w, 0)):.2f} |"
        )


if __name__ == "__main__":
    main()
