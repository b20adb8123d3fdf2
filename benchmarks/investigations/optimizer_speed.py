"""AdamW's step alone, per-tensor loop against foreach and fused, on the parameters of each dpobench size (random
gradients; CPU unless CUDA is present). Mean of 20 steps (5 at base) after 3 warm-ups, one implementation after the
other in one process.

    python benchmarks/investigations/optimizer_speed.py [--sizes tiny,small,base]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import build_model, sync

KINDS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
VOCABULARY = {"tiny": 128, "small": 128, "base": 512}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(VOCABULARY), help="comma-separated dpobench sizes")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"| size | parameters | {' | '.join(f'{k} ms' for k in KINDS)} | fused × per-tensor |")
    print("|---|---|" + "---|" * (len(KINDS) + 1))
    for size in args.sizes.split(","):
        vocab = VOCABULARY[size]
        ms = {}
        for kind, options in KINDS.items():
            parameters = list(build_model(size, vocab, device).parameters())
            for p in parameters:
                p.grad = torch.randn_like(p)
            optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, **options)
            for _ in range(3):
                optimizer.step()
            steps = 5 if size == "base" else 20
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            sync(device)
            ms[kind] = (time.perf_counter() - start) / steps * 1e3
        count = sum(p.numel() for p in parameters)
        cells = " | ".join(f"{ms[k]:.2f}" for k in KINDS)
        print(f"| {size} | {count:,} | {cells} | {ms['per-tensor'] / ms['fused']:.1f} |")


if __name__ == "__main__":
    main()
