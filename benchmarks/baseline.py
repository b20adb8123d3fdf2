"""The plain PyTorch baselines every speed figure is a ratio to, kept in this one place.

Imported by the benchmarks and by the test that checks dpobench's fast path against the plain one (never copied):

- ``plain_dpo_loss``: DPO written the plain way, for the loss-kernel timings;
- ``plain_dpo_step``: one training step the way a plain PyTorch DPO loop does it (issue #5's baseline): the
  reference model's forward on every step, the full float32 log-softmax over (rows, T, V), chosen and rejected
  concatenated into one forward, torch's default AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def plain_dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float = 0.1):
    """−logσ(β·((pc − rc) − (pr − rr))) per pair and the two implicit rewards, as in the DPO paper's code."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def full_softmax_logp(logits: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Σ log p of the target tokens per row, from a float32 log-softmax over the whole (rows, T, V)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * target_mask).sum(-1)


def plain_dpo_step(
    policy: Any, reference: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor, attention_mask: torch.Tensor,
    target_mask: torch.Tensor, *, beta: float = 0.1, autocast: bool = False, max_grad_norm: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One optimizer step on rows [chosen_1..B, rejected_1..B]; ``target_mask[:, t]`` marks that position t
    predicts a completion token. Returns the mean loss, the two rewards and the policy's log-probs (detached)."""
    b = ids.shape[0] // 2
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            reference_logits = reference(input_ids=ids, attention_mask=attention_mask).logits
        logits = policy(input_ids=ids, attention_mask=attention_mask).logits
    policy_logp = full_softmax_logp(logits, ids, target_mask)
    reference_logp = full_softmax_logp(reference_logits, ids, target_mask)
    losses, chosen, rejected = plain_dpo_loss(
        policy_logp[:b], policy_logp[b:], reference_logp[:b], reference_logp[b:], beta
    )  # fmt: skip
    loss = losses.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), chosen, rejected, policy_logp.detach()
