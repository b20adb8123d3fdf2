"""The training step, side by side: dpobench's own step, the plain PyTorch DPO step of ``baseline.py`` and,
where ``trl`` is importable, TRL's ``DPOTrainer``, on the same model, data and batch size, in one process.

    python -m pytest benchmarks/test_step_speed.py          # prints the ratios to the plain step at the end

On the CPU: the ``tiny`` and ``small`` sizes on the synthetic task's own pairs (varying lengths, 32 pairs per step).
On CUDA, in addition: the ``base`` size (134.5 M parameters with a 49152-entry vocabulary) on random-token pairs of
256 + 127 tokens, 8 pairs per step, bf16 autocast. Each round is one optimizer step; timings are never asserted.
"""

from __future__ import annotations

import platform

import pytest
import torch

import dpobench

from .steps import DpobenchStep, build_model, make_step, random_pairs, task_pairs
from .trl_step import trl_available

IMPLEMENTATIONS = ["dpobench", "plain", "trl"]
CASES = [("tiny", "cpu", 32, 60), ("small", "cpu", 32, 12)]  # size, device, pairs per step, rounds
if torch.cuda.is_available():
    CASES += [("tiny", "cuda", 32, 60), ("base", "cuda", 8, 10)]


@pytest.fixture(scope="module")
def task():
    return task_pairs()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("size", "device", "batch", "rounds"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_step(benchmark, task, implementation: str, size: str, device: str, batch: int, rounds: int) -> None:
    if implementation == "trl" and not trl_available():
        pytest.skip("trl is not importable here")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if size == "base":
        vocab, pad = 49152, 0
        pairs = random_pairs(batch * 16, 256, 127, vocab)
    else:
        pairs, vocab, pad = task
    model = build_model(size, vocab, "cpu")
    step = make_step(implementation, model, pairs, batch, device, pad)
    try:
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=2)
    finally:
        if hasattr(step, "close"):
            step.close()
    benchmark.extra_info.update(
        implementation=implementation, size=size, pairs_per_step=batch,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        torch=torch.__version__,
    )  # fmt: skip


@pytest.mark.parametrize("variant", sorted(dpobench.get_losses()))
def test_variant_step(benchmark, task, variant: str) -> None:
    """dpobench's step for every variant at the ``small`` size on the CPU: a variant should cost no more than
    its own loss arithmetic explains (the loss kernels are timed alone in test_loss_speed.py)."""
    pairs, vocab, pad = task
    step = DpobenchStep(build_model("small", vocab, "cpu"), pairs, 32, "cpu", pad, variant=variant)
    benchmark.pedantic(step, rounds=8, warmup_rounds=1)
    benchmark.extra_info.update(variant_step=variant, size="small", pairs_per_step=32, torch=torch.__version__,
                                device=platform.processor() or "cpu")  # fmt: skip
