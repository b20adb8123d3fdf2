"""Print a pytest-benchmark JSON as medians and ratios to the baseline measured in the same run.

python benchmarks/summarize.py loss_speed.json [--markdown]
"""

from __future__ import annotations

import json
import sys

import pandas as pd


def summarize(path: str) -> pd.DataFrame:
    data = json.loads(open(path).read())
    rows = [
        {
            "variant": b["extra_info"].get("variant", b["name"]),
            "device": b["extra_info"].get("device", "?"),
            "median_ms": b["stats"]["median"] * 1e3,
            "iqr_ms": b["stats"]["iqr"] * 1e3,
            "rounds": b["stats"]["rounds"],
        }
        for b in data["benchmarks"]
    ]
    frame = pd.DataFrame(rows)
    base = frame[frame.variant == "baseline_plain_dpo"].set_index("device").median_ms
    frame["x_baseline"] = frame.median_ms / frame.device.map(base)
    frame["million_pairs_per_s"] = (
        1.0 / frame.median_ms * 1e3 / 1e6 * data["benchmarks"][0]["extra_info"].get("pairs", 1)
    )
    return frame.sort_values(["device", "x_baseline"]).reset_index(drop=True)


def markdown(frame: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |"  # noqa: E731
    lines = [cells(frame.columns), "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + [cells(row) for row in frame.itertuples(index=False)])


if __name__ == "__main__":
    table = summarize(sys.argv[1])
    print(markdown(table) if "--markdown" in sys.argv else table.to_string(index=False))
