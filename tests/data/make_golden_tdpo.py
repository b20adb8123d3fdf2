"""Writes golden_tdpo.json: TDPO1 and TDPO2 losses and rewards computed by the official code's own ``tdpo_loss``
(Vance0124/Token-level-Direct-Preference-Optimization, ``trainers.py``), read from a checkout of that repository
(its function alone: the module imports a training stack this script does not need).

    git clone https://github.com/Vance0124/Token-level-Direct-Preference-Optimization /tmp/tdpo
    python tests/data/make_golden_tdpo.py /tmp/tdpo/trainers.py
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def official_tdpo_loss(trainers: Path):
    """The repository's ``tdpo_loss``, compiled from its source text."""
    tree = ast.parse(trainers.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tdpo_loss")
    scope = {"torch": torch, "F": F, "Tuple": tuple}
    exec(compile(ast.Module([function], type_ignores=[]), str(trainers), "exec"), scope)
    return scope["tdpo_loss"]


def main(trainers: str) -> None:
    tdpo_loss = official_tdpo_loss(Path(trainers))
    g = torch.Generator().manual_seed(25)
    n = 6
    inputs = {"chosen_logps_margin": (3 * torch.randn(n, generator=g)).tolist(),
              "rejected_logps_margin": (3 * torch.randn(n, generator=g)).tolist(),
              "chosen_position_kl": (2 * torch.rand(n, generator=g)).tolist(),
              "rejected_position_kl": (2 * torch.rand(n, generator=g)).tolist()}  # fmt: skip
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    cases = []
    for tdpo2, alpha, beta in ((False, 0.5, 0.1), (True, 0.5, 0.1), (True, 0.3, 0.5)):
        losses, chosen, rejected = tdpo_loss(t["chosen_logps_margin"], t["rejected_logps_margin"],
                                             t["chosen_position_kl"], t["rejected_position_kl"], beta=beta, alpha=alpha,
                                             if_tdpo2=tdpo2)  # fmt: skip
        cases.append({"case": f"{'tdpo2' if tdpo2 else 'tdpo1'} alpha={alpha} beta={beta}",
                      "params": {"beta": beta, "alpha": alpha, "tdpo1": not tdpo2}, "losses": losses.tolist(),
                      "chosen_rewards": chosen.tolist(), "rejected_rewards": rejected.tolist()})  # fmt: skip
    about = ("TDPO computed by the official code's tdpo_loss (Vance0124/Token-level-Direct-Preference-Optimization, "
             "trainers.py) on fixed log-ratios and sequential KLs. Made by make_golden_tdpo.py.")  # fmt: skip
    out = Path(__file__).with_name("golden_tdpo.json")
    out.write_text(json.dumps({"about": about, "inputs": inputs, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
