"""Draw the README's two figures (docs/frontier.png, docs/beta_sensitivity.png) from a real run's store.

    dpobench run --variants dpo,ipo,simpo,hinge,robust_dpo,sppo_hard,cal_dpo --betas 0.05,0.1,0.5,1 --out readme-run
    python docs/readme_figures.py readme-run/results.sqlite

The figures are the report's own (``dpobench.figures``), saved as PNG at 110 dpi.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dpobench import figures
from dpobench.tables import cell_finals, is_reference, read_tidy, summary_table


def main(store: str) -> None:
    finals = cell_finals(read_tidy(store))
    summary = summary_table(finals)
    colors = figures.variant_colors(finals[~is_reference(finals)].variant.unique())
    reference_gold = float(finals[is_reference(finals)].gold_reward.mean())
    out = Path(__file__).parent
    figures.frontier(summary, colors, reference_gold).savefig(out / "frontier.png", dpi=110)
    figures.beta_sensitivity(summary, colors).savefig(out / "beta_sensitivity.png", dpi=110)
    print(summary[["variant", "beta", "gold_reward", "kl_to_reference"]].to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1])
