"""Forward + backward of every registered variant on 1e6 synthetic pairs, beside the plain-DPO baseline.

    pytest benchmarks/test_loss_speed.py --benchmark-json loss_speed.json
    python benchmarks/summarize.py loss_speed.json     # medians as ratios to the baseline

Each row records device, dtype and versions in ``extra_info``. CUDA is synchronised before the
clock is read. Not part of the test suite (timings are never asserted).
"""

from __future__ import annotations

import platform

import pytest
import torch

import dpobench
from dpobench import LogProbs
from dpobench.losses import call_loss
from dpobench.testing import make_batch

from .baseline import plain_dpo_loss

PAIRS = 1_000_000


def inputs(device: str) -> tuple[LogProbs, LogProbs, torch.Tensor]:
    policy, reference, weights = make_batch(PAIRS, seed=0)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    leaf = lambda t: t.to(device).requires_grad_(True)  # noqa: E731
    policy = LogProbs(
        leaf(policy.chosen), leaf(policy.rejected), move(policy.chosen_tokens), move(policy.rejected_tokens),
        move(policy.chosen_logsumsq), move(policy.rejected_logsumsq),
    )  # fmt: skip
    reference = LogProbs(*(move(getattr(reference, f)) for f in LogProbs.__dataclass_fields__))
    return policy, reference, weights.to(device)


def describe(benchmark, device: str, variant: str) -> None:
    benchmark.extra_info.update(
        variant=variant, device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        dtype="float32", pairs=PAIRS, torch=torch.__version__, dpobench=dpobench.__version__,
    )  # fmt: skip


def timed(device: str, step):
    def run():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def test_baseline_plain_dpo(benchmark, device: str) -> None:
    policy, reference, _ = inputs(device)

    def step():
        policy.chosen.grad = policy.rejected.grad = None
        losses, _, _ = plain_dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
        losses.mean().backward()

    describe(benchmark, device, "baseline_plain_dpo")
    benchmark.pedantic(timed(device, step), rounds=40, warmup_rounds=3)


@pytest.mark.parametrize("name", sorted(dpobench.get_losses()))
def test_variant(benchmark, device: str, name: str) -> None:
    policy, reference, weights = inputs(device)
    loss = dpobench.get_loss(name)

    def step():
        policy.chosen.grad = policy.rejected.grad = None
        call_loss(loss, policy, reference, weights).losses.mean().backward()

    describe(benchmark, device, name)
    benchmark.pedantic(timed(device, step), rounds=40, warmup_rounds=3)
