"""Two `dpobench run` output folders side by side: per variant, the training time of a cell (the sum of its steps'
``step_time_ms``, compilation included), its median step, and the end-of-cell metrics, so a training setting
(``--compile``, say) can be judged on a real sweep: what it costs, what it saves, and that the results agree.

    dpobench run --device cuda --no-compile --variants dpo,ipo --out /tmp/eager
    dpobench run --device cuda --variants dpo,ipo --out /tmp/default      # compiled: the CUDA default
    python benchmarks/compare_runs.py /tmp/eager /tmp/default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpobench.store import Store

KEY = ["variant", "params", "beta", "seed", "scenario"]  # one cell of a sweep


def summary(folder: Path) -> pd.DataFrame:
    if not (folder / "results.sqlite").is_file():
        raise SystemExit(f"{folder}: no results.sqlite here; give the --out folder of a `dpobench run`")
    store = Store(folder / "results.sqlite")
    try:
        cells = store.frame("cells")
        steps = store.frame("steps")
        evaluations = store.frame("evaluations")
    finally:
        store.close()
    cells = cells[cells["role"] == "variant"].copy()  # the reference model's own cells left out
    cells["compile"] = [json.loads(c).get("compile") for c in cells["config"]]  # as resolved for the device
    timing = steps.groupby("cell_id")["step_time_ms"].agg(train_s=lambda s: s.sum() / 1e3, median_step_ms="median")
    last = evaluations.sort_values("step").groupby("cell_id").last()[["gold_reward", "kl_to_reference"]]
    cells = cells.sort_values("finished").drop_duplicates(KEY, keep="last")  # a store rerun with other settings
    table = cells.set_index("cell_id")[[*KEY, "compile", "status", "seconds"]].join(timing).join(last)
    return table.rename(columns={"seconds": "cell_s", "kl_to_reference": "kl"}).set_index(KEY).sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="output folder of the baseline run")
    parser.add_argument("other", type=Path, help="output folder of the run to compare")
    args = parser.parse_args()
    a, b = summary(args.baseline), summary(args.other)
    both = a.add_suffix(" a").join(b.add_suffix(" b"), how="inner")
    both["train a/b"] = both["train_s a"] / both["train_s b"]
    both["step a/b"] = both["median_step_ms a"] / both["median_step_ms b"]
    print(f"a = {args.baseline}, b = {args.other}; {len(both)} variants in both")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(both.round(3).to_string())
    totals = {k: float(both[f"{k} a"].sum() / both[f"{k} b"].sum()) for k in ("train_s", "cell_s")}
    print(f"\ntraining time a/b: {totals['train_s']:.2f}; cell time (evaluation included) a/b: {totals['cell_s']:.2f}")


if __name__ == "__main__":
    main()
