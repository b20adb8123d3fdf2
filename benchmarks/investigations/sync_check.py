"""Where a training step makes the host wait for the GPU, found by CUDA itself: ``torch.cuda.set_sync_debug_mode``
warns at every synchronising call (``.item()``, ``.tolist()``, ``nonzero``, a blocking copy), and each warning is
printed with the line of dpobench or transformers that made it. Expected: one per step, the step's metrics readback
in ``dpobench/train.py``; with one row per sequence, also transformers' packed-sequence check at the start of the
forward pass. (``tests/test_fast_path.py`` checks the same on the CPU, for operators only.)

    python benchmarks/investigations/sync_check.py            # CUDA only: the small size, eager, 32 varied pairs, both layouts
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import DpobenchStep, build_model, random_pairs
from dpobench.acceleration import SpeedOptions


def where(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame in dpobench or transformers (the line that asked), else the innermost."""
    ours = [f for f in frames if "/dpobench/" in f.filename or "/transformers/" in f.filename]
    frame = (ours or frames)[-1]
    return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} ({frame.name})"


def syncs(step, steps: int) -> collections.Counter[str]:
    """The synchronising calls of ``steps`` calls of ``step``, counted per place."""
    seen: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        seen[f"{where(traceback.extract_stack()[:-1])}: {str(message).splitlines()[0][:80]}"] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return seen


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sync_check.py needs CUDA: on the CPU, tests/test_fast_path.py makes the same check")
    pairs = random_pairs(512, 64, 48, 4096, varied=True)
    for share in (False, True):
        speed = SpeedOptions(compile=False, share_prompt=share)
        step = DpobenchStep(build_model("small", 4096, "cuda"), pairs, 32, "cuda", speed=speed)
        for _ in range(3):
            step()
        seen = syncs(step, 2)
        print(f"\n{'prompt shared' if share else 'one row per sequence'}: {sum(seen.values())} syncs in 2 steps")
        for site, count in seen.most_common():
            print(f"  {count} × {site}")


if __name__ == "__main__":
    main()
