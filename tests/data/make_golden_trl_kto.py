"""Writes golden_trl_kto.json: KTO and APO-zero (unpaired) losses and rewards computed by TRL's own
``KTOTrainer._compute_loss``.

TRL computes these losses inside its training step, from a model's log-probs, so this calls that method on a
stand-in trainer (the attributes the method reads) and stand-in models whose outputs carry fixed per-token log-probs:
TRL's code does all the arithmetic. A batch per call gives the mean loss (TRL returns no per-example losses) and the
mean rewards of each side; one example per call gives each example's loss with its own KL row.

    pip install --no-deps --target /tmp/trlpkgs trl==1.16.0 accelerate==1.16.0
    PYTHONPATH=/tmp/trlpkgs python tests/data/make_golden_trl_kto.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import KTOTrainer

N, T = 8, 10  # examples; row width (one prompt token, then up to T − 1 completion tokens)


def inputs() -> dict:
    """Per example: its completion's per-token log-probs under policy and reference, and its KL row's."""
    g = torch.Generator().manual_seed(23)
    lengths = torch.randint(1, T, (N,), generator=g).tolist()
    kl_lengths = torch.randint(1, T, (N,), generator=g).tolist()
    rows = lambda ns: [[-(0.2 + 3 * torch.rand((), generator=g).item()) for _ in range(n)] for n in ns]  # noqa: E731
    labels = [True, False, False, True, False, False, False, True]
    return {"labels": labels, "lengths": lengths, "kl_lengths": kl_lengths, "policy": rows(lengths),
            "reference": rows(lengths), "policy_kl": rows(kl_lengths), "reference_kl": rows(kl_lengths)}  # fmt: skip


def _table(rows: list[list[float]]) -> torch.Tensor:
    """(rows, T − 1) log-probs, each row's completion log-probs first (where the shifted completion mask is 1), 0 after."""
    out = torch.zeros(len(rows), T - 1)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values)
    return out


def _mask(lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = 1
    return mask


class _Model(torch.nn.Module):
    """A stand-in model: the KL rows (asked with ``KL``-prefixed inputs by TRL's ``_compute_kl_logps``, which passes
    them as ``input_ids``) and the completion rows each get their fixed log-probs, told apart by their marker id."""

    is_gradient_checkpointing = False

    def __init__(self, completions: list[list[float]], kl: list[list[float]]) -> None:
        super().__init__()
        self.completions, self.kl = _table(completions), _table(kl)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        log_probs = self.kl if int(input_ids[0, 0]) == 2 else self.completions
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_call(data: dict, rows: list[int], loss_type: str, params: dict) -> tuple[float, dict]:
    pick = lambda key: [data[key][r] for r in rows]  # noqa: E731
    n = len(rows)
    batch = {
        "input_ids": torch.ones(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
        "completion_mask": _mask(pick("lengths")), "label": torch.tensor(pick("labels")),
        "KL_input_ids": torch.full((n, T), 2, dtype=torch.long), "KL_attention_mask": torch.ones(n, T, dtype=torch.long),
        "KL_completion_mask": _mask(pick("kl_lengths")),
    }  # fmt: skip
    metrics: dict = {"train": defaultdict(list)}
    policy = _Model(pick("policy"), pick("policy_kl"))
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
        model=policy, ref_model=_Model(pick("reference"), pick("reference_kl")), precompute_ref_logps=False,
        calculate_KL=loss_type == "kto", aux_loss_enabled=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        loss_type=loss_type, beta=params.get("beta", 0.1), desirable_weight=params.get("desirable_weight", 1.0),
        undesirable_weight=params.get("undesirable_weight", 1.0), _metrics=metrics, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    loss = KTOTrainer._compute_loss(trainer, policy, batch, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in metrics["train"].items() if k.startswith(("rewards/", "kl"))}


def case(data: dict, loss_type: str, params: dict) -> dict:
    mean, metrics = trl_call(data, list(range(N)), loss_type, params)
    alone = [trl_call(data, [i], loss_type, params)[0] for i in range(N)]
    return {"case": f"{loss_type}{params}", "trl": loss_type, "params": params, "mean_loss": mean,
            "kl": metrics.get("kl"), "mean_chosen_reward": metrics["rewards/chosen"],
            "mean_rejected_reward": metrics["rewards/rejected"], "losses_alone": alone}  # fmt: skip


def main() -> None:
    data = inputs()
    cases = [case(data, "kto", {}), case(data, "kto", {"beta": 0.5, "desirable_weight": 1.33}),
             case(data, "apo_zero_unpaired", {}), case(data, "apo_zero_unpaired", {"beta": 0.5})]  # fmt: skip
    about = (f"KTO and APO-zero (unpaired) computed by TRL {trl.__version__}'s KTOTrainer._compute_loss from fixed "
             "per-token log-probs: mean_loss, kl and the mean rewards of a batch of all N examples; losses_alone, each "
             "example as a batch of one (its own KL row). Made by make_golden_trl_kto.py.")  # fmt: skip
    out = Path(__file__).with_name("golden_trl_kto.json")
    out.write_text(json.dumps({"about": about, "inputs": data, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
