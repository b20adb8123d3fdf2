"""The model-free landscape against closed forms."""

from __future__ import annotations

import math

import pytest

import dpobench
from dpobench.landscape import landscape


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def frame():
    registry = dpobench.get_losses()
    specs = [registry[n] for n in ("dpo", "ipo_paper", "sft", "aot", "wpo", "simpo")]
    return landscape(specs, betas=(0.1, 0.5), margins=(-4.0, 0.0, 2.0, 6.0), tokens=10)


@pytest.mark.parametrize(("beta", "h"), [(0.1, -4.0), (0.1, 0.0), (0.5, 2.0), (0.5, 6.0)])
def test_dpo_closed_form(frame, beta: float, h: float) -> None:
    row = frame[(frame.variant == "dpo") & (frame.beta == beta) & (frame.margin == h)].iloc[0]
    assert row.loss == pytest.approx(math.log1p(math.exp(-beta * h)))  # −logσ(βh)
    assert row.grad_weight == pytest.approx(beta * sigmoid(-beta * h))  # −∂ℓ/∂h
    assert row.preference_prob == pytest.approx(sigmoid(beta * h))  # σ(r_c − r_r)


def test_ipo_paper_gradient_changes_sign_at_its_target(frame) -> None:
    rows = frame[(frame.variant == "ipo_paper") & (frame.beta == 0.5)].set_index("margin")
    # ℓ = (h − 1)²: ℓ(2) = 1, −∂ℓ/∂h = −2(h − 1)
    assert rows.loss[2.0] == pytest.approx(1.0) and rows.grad_weight[2.0] == pytest.approx(-2.0)
    assert rows.grad_weight[-4.0] == pytest.approx(10.0)


def test_sft_and_simpo_use_policy_log_probs(frame) -> None:
    sft = frame[(frame.variant == "sft") & (frame.beta == 0.1)].set_index("margin")
    # pc = −10 + h/2 over 10 tokens: ℓ = 1 − h/20, −∂ℓ/∂h = 1/20
    assert sft.loss[6.0] == pytest.approx(0.7) and sft.grad_weight[6.0] == pytest.approx(0.05)
    assert bool(sft.reference_free.iloc[0]) is True
    simpo = frame[(frame.variant == "simpo") & (frame.beta == 2.0)].set_index("margin")
    assert bool(simpo.beta_is_default.iloc[0]) is True
    # z = 2·(h/10) − 0.5 at h = 2: −logσ(−0.1)
    assert simpo.loss[2.0] == pytest.approx(math.log1p(math.exp(0.1)))


def test_wrappers_and_batch_coupled_match_their_base_on_one_pair(frame) -> None:
    dpo = frame[frame.variant == "dpo"].reset_index()
    for name in ("aot", "wpo"):  # AOT of one pair is DPO; WPO's weight is 1 on this grid
        other = frame[frame.variant == name].reset_index()
        assert other.loss.tolist() == pytest.approx(dpo.loss.tolist())
        assert other.grad_weight.tolist() == pytest.approx(dpo.grad_weight.tolist())


@pytest.mark.parametrize("name", sorted(dpobench.get_losses()))
def test_one_batch_of_margins_gives_each_margin_alone(name: str) -> None:
    """The landscape evaluates a variant's margins as one batch, one pair per margin, unless the variant is
    ``batch_coupled``: either way each margin's loss, gradient and preference probability equal those of the margin
    as a batch of its own (what the landscape computed before, for every variant)."""
    import torch

    from dpobench.landscape import _evaluate, _evaluate_batch

    loss = dpobench.get_loss(name)
    margins = torch.linspace(-20.0, 20.0, 17, dtype=torch.float64)
    together = _evaluate(loss, margins, 20)
    alone = [_evaluate_batch(loss, margin[None], 20) for margin in margins]
    for part, values in enumerate(together):
        assert values == pytest.approx([a[part][0] for a in alone], rel=1e-12, abs=1e-12, nan_ok=True)
