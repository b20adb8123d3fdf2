"""Peak memory of one training step on the CPU, dpobench's step against the plain PyTorch step (and TRL where
importable), each in its own process: the peak resident set size (``ru_maxrss``) of a process that builds the model
and data, then runs ``--steps`` optimizer steps (2: the second is the first whose backward pass
runs beside the optimizer states). float32 (the CPU has no autocast here), so the absolute numbers are
larger than a bf16-autocast GPU's; the ratio shows what each way of computing log-probs keeps alive.

    python benchmarks/investigations/step_memory_cpu.py --compile      # base size, 4 pairs of 256 + 127 tokens, 2 steps
    python benchmarks/investigations/step_memory_cpu.py --size tiny --prompt 16 --completion 8 --steps 1    # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.steps import build_model, make_step, random_pairs
    from dpobench.acceleration import SpeedOptions

    torch.manual_seed(0)
    pairs = random_pairs(args.pairs * 4, args.prompt, args.completion, args.vocab)
    name = args.one.split()[0]
    model = build_model(args.size, args.vocab, "cpu")
    speed = SpeedOptions(compile=args.one.endswith("--compile"))
    step = make_step(name, model, pairs, args.pairs, "cpu", speed=speed)
    before = peak_mb()
    for _ in range(args.steps):
        step()
    if hasattr(step, "close"):
        step.close()
    print(json.dumps({"implementation": args.one, "peak_mb": peak_mb(), "before_steps_mb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=127)
    parser.add_argument("--steps", type=int, default=2)  # the 2nd step is the first with Adam states during backward
    parser.add_argument("--compile", action="store_true", help="also dpobench with --compile (regional)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    from benchmarks.trl_step import trl_available

    rows = []
    names = ["dpobench"] + (["dpobench --compile"] if args.compile else []) + ["plain"]
    for name in names + (["trl"] if trl_available() else []):
        command = [sys.executable, __file__, "--one", name, *[a for a in sys.argv[1:] if a != "--compile"]]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured: {rows[-1]}", flush=True)
    plain = next(r for r in rows if r["implementation"] == "plain")
    print(
        f"\n{args.size}, {args.pairs} pairs of {args.prompt} + {args.completion} tokens, {args.steps} step(s), float32 CPU:"
    )
    print("| implementation | peak RSS MB | × plain | peak − RSS before the first step, MB | × plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        grow, plain_grow = r["peak_mb"] - r["before_steps_mb"], plain["peak_mb"] - plain["before_steps_mb"]
        print(f"| {r['implementation']} | {r['peak_mb']:.0f} | {r['peak_mb'] / plain['peak_mb']:.2f} | {grow:.0f} | "
              f"{grow / plain_grow:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
