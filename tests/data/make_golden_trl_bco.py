"""Writes golden_trl_bco.json: BCO's losses, rewards and running reward shift computed by TRL 0.29's own
``BCOTrainer.bco_loss`` (TRL 1.x no longer has the trainer) over two consecutive training batches and one evaluation
batch, on a stand-in trainer holding the attributes the method reads.

    pip download --no-deps trl==0.29.1 && unzip trl-0.29.1-py3-none-any.whl -d /tmp/trl029
    PYTHONPATH=/tmp/trl029:/tmp/trlpkgs python tests/data/make_golden_trl_bco.py   # /tmp/trlpkgs holds accelerate
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.experimental.bco.bco_trainer import BCOTrainer, RunningMoments


def batch(g: torch.Generator, n_chosen: int, n_rejected: int) -> dict:
    logps = lambda n: (-(5 + 20 * torch.rand(n, generator=g))).tolist()  # noqa: E731
    return {"policy_chosen": logps(n_chosen), "policy_rejected": logps(n_rejected),
            "reference_chosen": logps(n_chosen), "reference_rejected": logps(n_rejected)}  # fmt: skip


def main() -> None:
    g = torch.Generator().manual_seed(24)
    batches = [batch(g, 3, 5), batch(g, 4, 2), batch(g, 2, 3)]
    cases = []
    for beta in (0.1, 0.5):
        trainer = SimpleNamespace(beta=beta, match_underlying_distribution=False,
                                  running=RunningMoments(accelerator=SimpleNamespace(use_distributed=False)))  # fmt: skip
        steps = []
        for number, b in enumerate(batches):
            t = {k: torch.tensor(v) for k, v in b.items()}
            losses, chosen, rejected, delta = BCOTrainer.bco_loss(
                trainer, t["policy_chosen"], t["policy_rejected"], t["reference_chosen"], t["reference_rejected"],
                None, None, do_train=number < 2,
            )  # fmt: skip
            steps.append({"train": number < 2, "losses": losses.tolist(), "chosen_rewards": chosen.tolist(),
                          "rejected_rewards": rejected.tolist(), "delta": float(delta)})  # fmt: skip
        cases.append({"case": f"bco beta={beta}", "params": {"beta": beta}, "steps": steps})
    about = (f"BCO computed by TRL {trl.__version__}'s BCOTrainer.bco_loss: two training batches then an evaluation "
             "batch (no update of the running shift), each batch's losses concatenated chosen then rejected, as TRL "
             "returns them. Made by make_golden_trl_bco.py.")  # fmt: skip
    out = Path(__file__).with_name("golden_trl_bco.json")
    out.write_text(json.dumps({"about": about, "batches": batches, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
