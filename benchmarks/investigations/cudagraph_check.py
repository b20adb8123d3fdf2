"""Do CUDA graphs pay on batches of varying width, and do they change the numbers? (on a CUDA GPU)

Four cells of dpobench's training step (``CellTrainer``) on the same model, data and batch plan, one after the other
in one process: compiled without CUDA graphs, compiled with them, with them again (a second cell, as in a sweep: are
the first cell's graphs reused?), and without them again (how far two runs without graphs drift apart). Prints per
cell: the time of the steps at a batch width met for the first time (where graphs are recorded), the median step
at widths already met, the graphs recorded, and how far each step's loss and gradient norm and the final weights
are from the first cell's. From those, the per-width cost of recording and the per-step saving give the break-even
that ``dpobench.acceleration.CUDA_GRAPH_MIN_STEPS_PER_WIDTH`` uses.

    python benchmarks/investigations/cudagraph_check.py                           # base size, varied lengths, 32 pairs, 150 steps
    python benchmarks/investigations/cudagraph_check.py --size tiny --device cpu --steps 6   # the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import add_data_arguments, build_model, cuda_graphs_recorded, load_data
from dpobench import get_loss
from dpobench.acceleration import CUDA_GRAPH_MIN_STEPS_PER_WIDTH, SpeedOptions, batch_widths, plan_acceleration
from dpobench.data import PairSet
from dpobench.logprobs import ReferenceLogps
from dpobench.models import SIZES
from dpobench.train import CellTrainer, TrainConfig


def run_cell(model, state, pairs, pad, args, cuda_graphs: bool) -> dict[str, object]:
    config = TrainConfig(steps=args.steps, batch_size=args.pairs, lr=1e-5)
    # graphs set on the plan rather than asked: on the CPU, where none can run, the plan leaves them out
    plan = replace(plan_acceleration(SpeedOptions(compile=True), args.device, model), cuda_graphs=cuda_graphs)
    reference = ReferenceLogps(torch.zeros(len(pairs)), torch.zeros(len(pairs)))
    loss = get_loss("dpo").to(args.device)
    trainer = CellTrainer(model, state, loss, PairSet(pairs), reference, pad, config, 0, acceleration=plan)
    widths = batch_widths(trainer.order, trainer.pairs, trainer.plan.share_prompt, trainer.plan.pad_multiple)
    before = cuda_graphs_recorded()
    seen: set[int] = set()
    first, again, losses, norms = [], [], [], []
    start = time.perf_counter()
    for width in widths:
        metrics = trainer.step()
        (again if width in seen else first).append(metrics["step_time_ms"])
        seen.add(width)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    wall = time.perf_counter() - start
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()]).clone()
    return {"graphs": trainer.plan.cuda_graphs, "recorded": cuda_graphs_recorded() - before, "widths": len(seen),
            "first": first, "again": again, "wall": wall, "losses": losses, "norms": norms, "weights": weights}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=list(SIZES))
    add_data_arguments(parser, "varied")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pairs, vocab, pad = load_data(args, 4096)
    model = build_model(args.size, vocab, args.device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{args.size}, {args.data} data, {args.pairs} pairs/step, {args.steps} steps, {name}, torch {torch.__version__}"
    )
    # the last cell repeats the first: how far two runs without graphs drift apart, the scale for the others' Δ
    cells = [("compiled, no CUDA graphs", False), ("CUDA graphs", True), ("CUDA graphs, a second cell", True),
             ("compiled, no CUDA graphs, again", False)]  # fmt: skip
    results = []
    for label, graphs in cells:
        result = run_cell(model, state, pairs, pad, args, graphs)
        results.append((label, result))
        print(f"measured: {label}: {result['wall']:.1f} s", flush=True)
    base = results[0][1]
    print("\n| cell | graphs | widths | graphs recorded | s in all | first-width steps: ms each (mean) | "
          "later steps: median ms | max Δ loss | max Δ grad norm | max Δ weight |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results:
        dl = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        dn = max(abs(a - b) for a, b in zip(r["norms"], base["norms"], strict=True))
        dw = float((r["weights"] - base["weights"]).abs().max())
        later = statistics.median(r["again"]) if r["again"] else float("nan")
        print(f"| {label} | {r['graphs']} | {r['widths']} | {r['recorded']} | {r['wall']:.1f} | "
              f"{statistics.fmean(r['first']):.0f} | {later:.1f} | {dl:.2e} | {dn:.2e} | {dw:.2e} |")  # fmt: skip
    eager, graphed = results[0][1], results[1][1]
    if eager["again"] and graphed["again"]:
        saving = statistics.median(eager["again"]) - statistics.median(graphed["again"])
        cost = statistics.fmean(graphed["first"][1:] or graphed["first"]) - statistics.median(graphed["again"])
        print(f"\nper new width, recording costs {cost:.0f} ms beyond a step (the first cell's widths after its first); "
              f"a step at a known width saves {saving:.1f} ms: break-even after {cost / saving:.0f} steps per width "
              f"(dpobench's default asks {CUDA_GRAPH_MIN_STEPS_PER_WIDTH})" if saving > 0 else
              f"\nat known widths graphs saved nothing ({saving:.1f} ms per step)")  # fmt: skip
    print(
        f"this plan: {args.steps} steps over {graphed['widths']} widths "
        f"({args.steps / graphed['widths']:.0f} per width): the default would "
        f"{'' if args.steps >= CUDA_GRAPH_MIN_STEPS_PER_WIDTH * graphed['widths'] else 'not '}use graphs"
    )


if __name__ == "__main__":
    main()
