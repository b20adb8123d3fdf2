"""Hand-worked values for every variant TRL 1.16 does not compute (the golden file covers the rest).

One pair, chosen to make the arithmetic easy: pc = −10, pr = −12, rc = rr = −11, 5 and 4 tokens, so
Δc = +1, Δr = −1, h = Δc − Δr = 2. Expected values are written with `math`, independently of torch.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpobench
from dpobench import LogProbs


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # −logσ(−x)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def one_pair(pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, lc=5.0, lr=4.0, lsc=None, lsr=None):
    t = lambda v: None if v is None else torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return LogProbs(t(pc), t(pr), t(lc), t(lr), t(lsc), t(lsr)), LogProbs(t(rc), t(rr), t(lc), t(lr))


def loss_of(name: str, policy_reference=None, weights=None, **params) -> float:
    policy, reference = policy_reference or one_pair()
    loss = dpobench.get_loss(name, **params)
    extras = {"weights": torch.tensor([weights], dtype=torch.float64)} if weights is not None else {}
    return float(loss(policy, reference, **extras).losses[0])


DPO_AT_H2_BETA_HALF = softplus(-1.0)  # −logσ(0.5·2) = log(1 + e^−1) = 0.31326…


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("dpo", {"beta": 0.5}, DPO_AT_H2_BETA_HALF),
        # cDPO: 0.9·(−logσ(1)) + 0.1·(−logσ(−1)) = −logσ(1) + 0.1·1
        ("cdpo", {"beta": 0.5}, DPO_AT_H2_BETA_HALF + 0.1),
        # seed Robust DPO: r_c = 0.5, r_r = −0.5; −logσ(1) + 0.1·(0.25 + 0.25)
        ("seed_robust_dpo", {"beta": 0.5, "eta": 0.1}, DPO_AT_H2_BETA_HALF + 0.05),
        # seed KL-DPO: −logσ(1) + 0.01·(1² + 1²)
        ("seed_kl_dpo", {"beta": 0.5, "kl_weight": 0.01}, DPO_AT_H2_BETA_HALF + 0.02),
        # R-DPO: −logσ(0.5·2 + 0.05·(5 − 4))
        ("len_reg_dpo", {"beta": 0.5, "alpha": 0.05}, softplus(-1.05)),
        # Cal-DPO, β = 0.25 (targets ±2): −logσ(2) + ½·((1 − 2)² + (−1 + 2)²)
        ("cal_dpo", {"beta": 0.25}, softplus(-2.0) + 1.0),
        # IPO as in the paper (summed log-probs): (2 − 1/(2·0.5))² = 1
        ("ipo_paper", {"beta": 0.5}, 1.0),
        # TRL's IPO normalises: (1/5 − (−1)/4 − 1)² = (0.45 − 1)² = 0.3025
        ("ipo", {"beta": 0.5}, 0.3025),
        # f-DPO, Jensen-Shannon: s(1) − s(−1) = logσ(1) − logσ(−1) = 1, so −logσ(0.5·1)
        ("fdpo_js", {"beta": 0.5}, softplus(-0.5)),
        # f-DPO, forward KL: (1 − e^−1) − (1 − e^1) = e − e^−1 = 2·sinh(1)
        ("fdpo_forward_kl", {"beta": 0.5}, softplus(-0.5 * 2 * math.sinh(1))),
        # SFT: −pc/lc = 10/5
        ("sft", {}, 2.0),
        # RPO = DPO + SFT
        ("rpo", {"beta": 0.5}, DPO_AT_H2_BETA_HALF + 2.0),
        # MPO = 0.8·DPO + 0.2·BCO + 1.0·SFT; BCO = −logσ(0.5) − logσ(0.5)
        ("mpo", {"beta": 0.5}, 0.8 * DPO_AT_H2_BETA_HALF + 0.2 * 2 * softplus(-0.5) + 2.0),
        # combined with a string spec: 2·hinge + 1·sft; hinge = max(0, 1 − 0.25·2) = 0.5
        ("combined", {"beta": 0.25, "components": "hinge:2,sft:1"}, 2 * 0.5 + 2.0),
        # AlphaPO, its defaults α = 0.25, β = 2.5, γ = 0.1; averages a = −10/5 = −2, b = −12/4 = −3:
        # r(a) − r(b) = ((1 − e^0.5) − (1 − e^0.75))/0.25 = 4·(e^0.75 − e^0.5)
        ("alphapo", {}, softplus(-(2.5 * 4 * (math.exp(0.75) - math.exp(0.5)) - 0.1))),
        # at α = 0 the reward is the average log-prob itself: SimPO's −logσ(2.5·(−2 + 3) − 0.1)
        ("alphapo", {"alpha": 0.0}, softplus(-2.4)),
        # SimPER: −e^(−10/5) + e^(−12/4)
        ("simper", {}, -math.exp(-2) + math.exp(-3)),
        # paired KTO, one pair: reference points max(0, Δc) = 1 and max(0, Δr) = 0;
        # ½·[(1 − σ(0.5·(1 − 0))) + (1 − σ(0.5·(1 − (−1))))]
        ("kto_pair", {"beta": 0.5}, 0.5 * ((1 - sigmoid(0.5)) + (1 - sigmoid(1.0)))),
        # DPO-Shift, λ = 0.95: −logσ(0.5·1 − 0.95·0.5·(−1))
        ("dpo_shift", {"beta": 0.5}, softplus(-0.975)),
        ("dpo_shift", {"beta": 0.5, "shift": 1.0}, DPO_AT_H2_BETA_HALF),  # λ = 1 is DPO
        # χPO: h = 0.5·(e¹ − e⁻¹) + 0.5·(1 − (−1)) = 2.1752…; clipped at 2·R_max = 2 with R_max = 1
        ("chipo", {"beta": 0.5}, softplus(-(0.5 * (math.e - 1 / math.e) + 1.0))),
        ("chipo", {"beta": 0.5, "r_max": 1.0}, softplus(-2.0)),
    ],
)
def test_hand_worked(name: str, params: dict, expected: float) -> None:
    assert loss_of(name, **params) == pytest.approx(expected, rel=1e-12)


def test_fdpo_alpha_uses_the_paper_convention() -> None:
    # Paper α = 0.3: s(Δ) = (1 − e^(−0.3Δ))/0.3. TRL writes it with a = 1 − α = 0.7: (e^((a−1)Δ) − 1)/(a − 1).
    alpha = 0.3
    s = lambda d: (1 - math.exp(-alpha * d)) / alpha  # noqa: E731
    trl = lambda d, a=0.7: (math.exp((a - 1) * d) - 1) / (a - 1)  # noqa: E731
    assert s(1.0) == pytest.approx(trl(1.0)) and s(-1.0) == pytest.approx(trl(-1.0))
    got = loss_of("dpo", beta=0.5, f_divergence="alpha_divergence", f_alpha=alpha)
    assert got == pytest.approx(softplus(-0.5 * (s(1.0) - s(-1.0))), rel=1e-6)
    # α → 0 is reverse KL (DPO), α = 1 is forward KL.
    assert loss_of("dpo", beta=0.5, f_divergence="alpha_divergence", f_alpha=0.0) == pytest.approx(DPO_AT_H2_BETA_HALF)
    assert loss_of("dpo", beta=0.5, f_divergence="alpha_divergence", f_alpha=1.0) == pytest.approx(
        loss_of("fdpo_forward_kl", beta=0.5), rel=1e-6
    )


def test_dpop_penalises_a_chosen_drop_below_the_reference() -> None:
    # pc ≥ rc: no penalty, the DPO value.
    assert loss_of("dpop", beta=0.5, dpop_lambda=5.0) == pytest.approx(DPO_AT_H2_BETA_HALF)
    # pc = −12 < rc = −11: Δc = −1, Δr = −3, h = 2, penalty 1: −logσ(0.5·(2 − 5·1)) = log(1 + e^1.5)
    dropped = one_pair(pc=-12.0, pr=-14.0)
    assert loss_of("dpop", dropped, beta=0.5, dpop_lambda=5.0) == pytest.approx(softplus(1.5))


def test_seed_custom_dpo_normalises_weights_and_tempers() -> None:
    # Per-token: pc/5 = −2, rc/5 = −2.2, pr/4 = −3, rr/4 = −2.75 → r_c = 0.5·0.2, r_r = 0.5·(−0.25).
    logits = (0.5 * 0.2 - 0.5 * -0.25) / 2.0  # temperature 2
    assert loss_of("seed_custom_dpo", weights=0.5, beta=0.5, temperature=2.0) == pytest.approx(0.5 * softplus(-logits))
    # Each switch off: no length normalisation → logits = 0.5·2/2; no weighting → factor 1.
    assert loss_of(
        "seed_custom_dpo", weights=0.5, beta=0.5, temperature=2.0, length_normalization=False
    ) == pytest.approx(0.5 * softplus(-0.5))
    assert loss_of(
        "seed_custom_dpo", weights=0.5, beta=0.5, temperature=2.0, confidence_weighting=False
    ) == pytest.approx(softplus(-logits))
    policy, reference = one_pair()
    out = dpobench.get_loss("seed_custom_dpo", beta=0.5)(policy, reference)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.1) and float(out.rejected_rewards[0]) == pytest.approx(
        -0.125
    )


def test_wpo_weights_pairs_by_policy_likelihood() -> None:
    # w_c = exp((−10 − (−15))/5) = e, w_r = exp((−12 − (−4))/4) = e^−2: W = e^−1 (below the clamp).
    pair = one_pair(lsc=-15.0, lsr=-4.0)
    assert loss_of("wpo", pair, beta=0.5) == pytest.approx(math.exp(-1) * DPO_AT_H2_BETA_HALF)
    # w_c = exp((−10 + 20)/5) = e², w_r = exp((−12 + 8)/4) = e^−1: W = e > 1, clamped to 1 (official)
    # or kept (TRL 1.16).
    pair = one_pair(lsc=-20.0, lsr=-8.0)
    assert loss_of("wpo", pair, beta=0.5) == pytest.approx(DPO_AT_H2_BETA_HALF)
    assert loss_of("wpo", pair, beta=0.5, clamp=False) == pytest.approx(math.e * DPO_AT_H2_BETA_HALF)
    # Any base variant: WPO over IPO (paper) scales (2 − 1)² = 1.
    assert loss_of("wpo", one_pair(lsc=-15.0, lsr=-4.0), beta=0.5, base="ipo_paper") == pytest.approx(math.exp(-1))


def test_wpo_weight_carries_no_gradient() -> None:
    policy, reference = one_pair(lsc=-15.0, lsr=-4.0)
    policy = LogProbs(
        policy.chosen.clone().requires_grad_(), policy.rejected.clone().requires_grad_(), policy.chosen_tokens,
        policy.rejected_tokens, policy.chosen_logsumsq, policy.rejected_logsumsq,
    )  # fmt: skip
    dpobench.get_loss("wpo", beta=0.5)(policy, reference).losses.sum().backward()
    # d/dpc of W·(−logσ(β·h)) with W fixed: −W·β·σ(−β·h) = −e^−1 · 0.5 · σ(−1)
    expected = -math.exp(-1) * 0.5 / (1 + math.e)
    assert float(policy.chosen.grad[0]) == pytest.approx(expected)


def test_wpo_without_per_token_statistics_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="per-token statistics"):
        loss_of("wpo")


def test_reference_free_variants_ignore_the_reference() -> None:
    policy, reference = one_pair()
    for name in ("cpo", "simpo", "orpo", "sft"):
        loss = dpobench.get_loss(name)
        assert loss.reference_free
        assert torch.equal(loss(policy, reference).losses, loss(policy, None).losses)


def test_reference_based_variant_without_reference_is_a_clear_error() -> None:
    policy, _ = one_pair()
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs"):
        dpobench.get_loss("dpo")(policy, None)


def test_orpo_is_finite_for_a_certain_response() -> None:
    # pc = 0 (probability 1): TRL's log1p(−exp(0)) = −inf; dpobench clamps the average at −1e-6.
    policy, reference = one_pair(pc=0.0)
    out = dpobench.get_loss("orpo")(policy, reference)
    assert torch.isfinite(out.losses).all()


def test_kto_pair_takes_its_reference_points_from_the_batch_as_trl_did() -> None:
    """Two pairs, Δc = (1, 3), Δr = (−1, 1): the reference points are the batch means clamped at 0, z_c = 2 and
    z_r = max(0, 0) = 0, so pair i's loss is ½·[(1 − σ(β·Δc_i)) + (1 − σ(β·(2 − Δr_i)))]. TRL ≤ 0.9.4 concatenated
    the 2B terms and averaged them: the same mean. At β = 0.1 and the one pair above (z_c = 1, z_r = 0), TRL's
    formula gives ½·[(1 − σ(0.1)) + (1 − σ(0.2))] = 0.462593…"""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    policy = LogProbs(t(-10.0, -8.0), t(-12.0, -10.0), t(5.0, 5.0), t(4.0, 4.0))
    reference = LogProbs(t(-11.0, -11.0), t(-11.0, -11.0), t(5.0, 5.0), t(4.0, 4.0))
    out = dpobench.get_loss("kto_pair", beta=0.5)(policy, reference)
    expected = [0.5 * ((1 - sigmoid(0.5 * dc)) + (1 - sigmoid(0.5 * (2 - dr)))) for dc, dr in ((1, -1), (3, 1))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    trl_terms = [1 - sigmoid(0.5 * dc) for dc in (1, 3)] + [1 - sigmoid(0.5 * (2 - dr)) for dr in (-1, 1)]
    assert float(out.losses.mean()) == pytest.approx(sum(trl_terms) / 4, rel=1e-12)
    assert loss_of("kto_pair", beta=0.1) == pytest.approx(0.462593, abs=1e-6)


def per_token_pair(policy_c, policy_r, reference_c, reference_r):
    """One pair given token by token (lists of log-probs), as policy and reference LogProbs with per-token rows."""
    width = max(len(policy_c), len(policy_r))
    row = lambda values: torch.tensor([values + [0.0] * (width - len(values))], dtype=torch.float64)  # noqa: E731
    tokens_c = torch.tensor([float(len(policy_c))], dtype=torch.float64)
    tokens_r = torch.tensor([float(len(policy_r))], dtype=torch.float64)

    def side(chosen, rejected):
        return LogProbs(row(chosen).sum(1), row(rejected).sum(1), tokens_c, tokens_r, chosen_token_logps=row(chosen),
                        rejected_token_logps=row(rejected))  # fmt: skip

    return side(policy_c, policy_r), side(reference_c, reference_r)


def test_ld_dpo_weighs_the_longer_answers_extra_tokens_by_alpha() -> None:
    """Chosen 2 tokens, rejected 4, so ℓ_s = 2 and the rejected answer's last two tokens count α times. Log-ratios per
    token: chosen (+0.5, +0.5); rejected (−0.25, −0.25, −1, −1). α = 0.5: Δc = 1, Δr = −0.5 + 0.5·(−2) = −1.5;
    loss −logσ(0.5·2.5)."""
    pair = per_token_pair([-1.0, -2.0], [-1.0, -1.0, -2.0, -2.0], [-1.5, -2.5], [-0.75, -0.75, -1.0, -1.0])
    out = dpobench.get_loss("ld_dpo", beta=0.5, alpha=0.5)(*pair)
    assert float(out.losses[0]) == pytest.approx(softplus(-1.25))
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5) and float(out.rejected_rewards[0]) == pytest.approx(-0.75)
    # α = 1 is DPO on the plain sums: Δr = −2.5, −logσ(0.5·3.5)
    assert loss_of("ld_dpo", pair, beta=0.5, alpha=1.0) == pytest.approx(softplus(-1.75))


def test_sampo_sums_as_many_log_ratios_on_each_side_drawn_without_replacement() -> None:
    """Chosen 2 tokens with log-ratios (+0.5, +0.5), rejected 4 with (−0.1, −0.2, −0.3, −0.4): SamPO keeps 2 of the
    rejected answer's 4, so Δ̂r is the sum of one of the 6 pairs of distinct log-ratios, each pair drawn as often (1/6:
    −0.5 comes from two pairs); the chosen answer keeps both, Δ̂c = 1. Over 600 seeded draws: only those sums, each
    100 ± 40 times per pair that makes it."""
    pair = per_token_pair([-1.0, -2.0], [-1.1, -1.2, -1.3, -1.4], [-1.5, -2.5], [-1.0, -1.0, -1.0, -1.0])
    loss = dpobench.get_loss("sampo", beta=0.5)
    torch.manual_seed(0)
    seen: dict[float, int] = {}
    for _ in range(600):
        out = loss(*pair)
        assert float(out.chosen_rewards[0]) == pytest.approx(0.5)
        dr = round(float(out.rejected_rewards[0]) / 0.5, 6)
        assert float(out.losses[0]) == pytest.approx(softplus(-0.5 * (1.0 - dr)))
        seen[dr] = seen.get(dr, 0) + 1
    pairs: dict[float, int] = {}
    for a, b in ((a, b) for a in (0.1, 0.2, 0.3, 0.4) for b in (0.1, 0.2, 0.3, 0.4) if a < b):
        pairs[round(-(a + b), 6)] = pairs.get(round(-(a + b), 6), 0) + 1
    assert sorted(seen) == sorted(pairs)
    assert all(60 * pairs[s] <= n <= 140 * pairs[s] for s, n in seen.items()), seen


def test_sampo_of_equal_lengths_is_dpo() -> None:
    pair = per_token_pair([-1.0, -2.0], [-1.1, -1.2], [-1.5, -2.5], [-1.0, -1.0])
    expected = softplus(-0.5 * (1.0 - (-0.3)))
    assert loss_of("sampo", pair, beta=0.5) == pytest.approx(expected) == loss_of("dpo", pair, beta=0.5)


def test_a_per_token_loss_without_per_token_log_probs_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="reads per-token log-probs: give the policy's chosen_token_logps"):
        dpobench.get_loss("ld_dpo")(*one_pair())


@pytest.mark.parametrize(
    ("margin", "alpha", "expected"),
    [
        # h = 2, β = 0.5: −logσ(1 − α·log m)
        (0.5, 1.0, softplus(-(1 + math.log(2)))),  # a barely-preferred pair: a negative offset, an easier target
        (2.0, 1.0, softplus(-(1 - math.log(2)))),  # a clear one: it must win by more
        (1.0, 1.0, DPO_AT_H2_BETA_HALF),  # log 1 = 0: DPO
        (2.0, 0.0, DPO_AT_H2_BETA_HALF),  # α = 0: DPO
        (0.0, 1.0, softplus(-(1 - math.log(1e-3)))),  # a tie floored at 10⁻³
    ],
)
def test_odpo_offsets_the_margin_by_the_log_score_margin(margin: float, alpha: float, expected: float) -> None:
    policy, reference = one_pair()
    loss = dpobench.get_loss("odpo", beta=0.5, alpha=alpha)
    out = loss(policy, reference, margin=torch.tensor([margin], dtype=torch.float64))
    assert float(out.losses[0]) == pytest.approx(expected)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5) and float(out.rejected_rewards[0]) == pytest.approx(-0.5)


def gaps_batch(gaps: list[float]) -> tuple[LogProbs, LogProbs]:
    """Pairs whose reward gaps Δc − Δr are ``gaps`` (Δc = gap, Δr = 0), in float64."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(gaps)
    tokens = t([5.0] * n)
    return LogProbs(t([-10.0 + g for g in gaps]), t([-12.0] * n), tokens, tokens), LogProbs(
        t([-10.0] * n), t([-12.0] * n), tokens, tokens
    )


def test_beta_dpo_adapts_beta_to_the_running_gap_statistics_and_resets() -> None:
    """Gaps (1, 2, 3, 6): mean 3. No filtering (ρ = 0). From M = 0: M ← 0.1·3 = 0.3 before the loss, so
    β_B = 0.5·(1 + 0.6·(3 − 0.3)) = 1.31 and ℓ_i = −logσ(1.31·A_i). The same batch again: M = 0.9·0.3 + 0.3 = 0.57,
    β_B = 0.5·(1 + 0.6·2.43) = 1.229. Reset: the first value again. In eval mode the statistics stay."""
    gaps = [1.0, 2.0, 3.0, 6.0]
    loss = dpobench.get_loss("beta_dpo", beta=0.5, scale=0.6, filter_ratio=0.0)
    first = loss(*gaps_batch(gaps)).losses
    assert first.tolist() == pytest.approx([softplus(-1.31 * a) for a in gaps])
    assert float(loss.gap_mean) == pytest.approx(0.3)
    assert float(loss.gap_std) == pytest.approx(0.1 * math.sqrt(14 / 3))
    second = loss(*gaps_batch(gaps)).losses
    assert second.tolist() == pytest.approx([softplus(-1.229 * a) for a in gaps])
    loss.eval()
    assert loss(*gaps_batch(gaps)).losses.tolist() == pytest.approx(second.tolist())  # 0.57 again: no update
    assert float(loss.gap_mean) == pytest.approx(0.57)
    loss.train()
    loss.reset()
    assert loss(*gaps_batch(gaps)).losses.tolist() == pytest.approx(first.tolist())
    rewards = loss(*gaps_batch(gaps))
    assert rewards.chosen_rewards.tolist() == pytest.approx([0.5 * a for a in gaps])  # the base β


def test_beta_dpo_filters_outliers_and_averages_over_the_kept_pairs() -> None:
    """ρ = 0.25 of 4 pairs: 3 kept, each kept loss ×4/3 so that the batch mean is the kept pairs' mean. With the
    running statistics at M = 0, S = 1 (eval mode: they stay) the gap 50 has weight e^−1250, and is never kept."""
    gaps = [0.0, 0.1, -0.1, 50.0]
    loss = dpobench.get_loss("beta_dpo", beta=0.5, scale=0.6, filter_ratio=0.25)
    loss.gap_std.fill_(1.0)
    loss.eval()
    torch.manual_seed(0)
    for _ in range(50):
        out = loss(*gaps_batch(gaps)).losses
        assert float(out[3]) == 0.0
        beta = 0.5 * (1 + 0.6 * (0.0 - 0.0))  # the kept gaps 0, 0.1, −0.1 have mean 0
        assert out[:3].tolist() == pytest.approx([softplus(-beta * a) * 4 / 3 for a in gaps[:3]])
