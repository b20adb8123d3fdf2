"""Does a ranking found on the tiny model hold on larger ones, and on a real pretrained one? The same variants
trained on the tiny and small models (dpobench's own, full fine-tuning) and on SmolLM2-135M (LoRA), each on its own
pairs of the VADER-labelled task (``--judge vader`` without ``--data``: the task's prompts, two samples of the model
per prompt, the one VADER scores higher chosen), for each seed; then every pair of the three stores compared
(``dpobench.transfer.rank_transfer``: Kendall's τ and Spearman's ρ with bootstrap intervals over the evaluation
prompts, seeds averaged prompt by prompt).

Everything but the model (and LoRA on SmolLM2) is the same: the data recipe, steps, batch, β, seeds, judge. Sized
for a 2-core CPU within 45 minutes (a SmolLM2 cell is about two minutes there); the defaults are the run in
benchmarks/RESULTS.md.

    python benchmarks/transfer_study.py --out transfer-study
    python benchmarks/transfer_study.py --out transfer-study --steps 10 --prompts 32 --seeds 0     # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("dpo", "cdpo", "ipo", "hinge", "robust_dpo", "sppo_hard", "nca_pair", "simpo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=256, help="training prompts (held-out: a quarter, eval: 64)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per sample")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seeds", default="0,1", help="training seeds, every model")
    parser.add_argument("--models", default="tiny,small,smollm2-lora", help="of tiny, small, smollm2-lora")
    args = parser.parse_args()

    from dpobench.config import LoraOptions, SweepConfig
    from dpobench.data import DataRecipe
    from dpobench.sweep import run_sweep
    from dpobench.train import TrainConfig
    from dpobench.transfer import rank_transfer

    recipe = DataRecipe(train_prompts=args.prompts, heldout_prompts=args.prompts // 4, eval_prompts=64,
                        max_new_tokens=args.tokens)  # fmt: skip
    base = SweepConfig(variants=tuple(args.variants.split(",")), judge="vader", data_recipe=recipe, step_cost_rounds=0,
                       seeds=tuple(int(seed) for seed in args.seeds.split(",")),
                       train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr))  # fmt: skip
    known = {"tiny": replace(base, model="tiny"), "small": replace(base, model="small"),
             "smollm2-lora": replace(base, model="smollm2-135m", lora=LoraOptions(enabled=True))}  # fmt: skip
    runs = {name: known[name] for name in args.models.split(",")}
    for name, config in runs.items():
        started = time.perf_counter()
        run_sweep(config, args.out / name, progress=lambda message, run=name: print(f"[{run}] {message}", flush=True))
        print(f"[{name}] {time.perf_counter() - started:.0f} s", flush=True)
    for first, other in itertools.combinations(runs, 2):
        result = rank_transfer(args.out / first, args.out / other)
        print(f"\n{first} against {other}")
        print(result.table.to_string(index=False))
        print(f"Kendall τ-b = {result.tau:.2f} ({result.tau_interval[0]:.2f} to {result.tau_interval[1]:.2f}); "
              f"Spearman ρ = {result.rho:.2f} ({result.rho_interval[0]:.2f} to {result.rho_interval[1]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
