"""Writes golden_trl_ld_dpo.json: LD-DPO losses and rewards computed by TRL's own ``DPOTrainer._compute_loss``.

TRL computes LD-DPO inside its training step, from a model's per-token log-probs, so this calls that method on a
stand-in trainer (the attributes the method reads) and a stand-in model whose output carries fixed per-token
log-probs: TRL's code does all the arithmetic. One pair per call gives each pair's loss and rewards.

    pip install --no-deps --target /tmp/trlpkgs trl==1.16.0 accelerate==1.16.0
    PYTHONPATH=/tmp/trlpkgs python tests/data/make_golden_trl_ld_dpo.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import DPOTrainer

B, T = 6, 12  # pairs; row width (one prompt token, then up to T − 1 completion tokens)


def inputs() -> dict:
    g = torch.Generator().manual_seed(22)
    lengths = torch.randint(1, T, (2 * B,), generator=g).tolist()
    lengths[0], lengths[B] = 3, 3  # a pair of equal lengths: nothing past the shared length
    per_token = lambda: [[-(0.2 + 3 * torch.rand((), generator=g).item()) for _ in range(n)] for n in lengths]  # noqa: E731
    return {"lengths": lengths, "policy": per_token(), "reference": per_token()}


class _Model(torch.nn.Module):
    """A stand-in model: its output's ``log_probs`` (rows, T − 1) hold each completion token's log-prob where TRL's
    shifted completion mask is 1, and 0 elsewhere (as a fused head gives for labels of −100)."""

    is_gradient_checkpointing = False

    def __init__(self, per_token: list[list[float]]) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, **_: object) -> SimpleNamespace:
        n = len(self.per_token)
        log_probs = torch.zeros(n, T - 1)
        for row, values in enumerate(self.per_token):
            log_probs[row, : len(values)] = torch.tensor(values)
        zeros = torch.zeros(n, T - 1)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_case(data: dict, alpha: float, beta: float) -> dict:
    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in range(B):
        rows = [i, B + i]  # TRL's batch: the chosen rows, then the rejected rows
        lengths = [data["lengths"][r] for r in rows]
        mask = torch.zeros(2, T, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, 1 : 1 + n] = 1
        batch = {"input_ids": torch.ones(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T, dtype=torch.long),
                 "completion_mask": mask}  # fmt: skip
        metrics: dict = {"train": defaultdict(list)}
        policy = _Model([data["policy"][r] for r in rows])
        trainer = SimpleNamespace(
            accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
            model=policy, ref_model=_Model([data["reference"][r] for r in rows]), ld_alpha=alpha,
            precompute_ref_logps=False, aux_loss_enabled=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
            label_smoothing=0.0, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
        )  # fmt: skip
        loss = DPOTrainer._compute_loss(trainer, policy, batch, return_outputs=False)
        losses.append(float(loss))
        chosen_rewards.append(metrics["train"]["rewards/chosen"][-1])
        rejected_rewards.append(metrics["train"]["rewards/rejected"][-1])
    return {"case": f"ld_alpha={alpha},beta={beta}", "params": {"alpha": alpha, "beta": beta}, "losses": losses,
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}  # fmt: skip


def main() -> None:
    data = inputs()
    cases = [trl_case(data, alpha, beta) for alpha, beta in ((0.5, 0.1), (0.2, 0.5), (1.0, 0.1), (0.0, 0.1))]
    about = (f"LD-DPO per-pair losses and rewards computed by TRL {trl.__version__}'s DPOTrainer._compute_loss "
             "(loss_type sigmoid, ld_alpha) from fixed per-token log-probs, one pair per call; rows 0..B-1 chosen, "
             "B..2B-1 rejected, each row's completion log-probs in order. Made by make_golden_trl_ld_dpo.py.")  # fmt: skip
    out = Path(__file__).with_name("golden_trl_ld_dpo.json")
    out.write_text(json.dumps({"about": about, "inputs": data, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
