"""Every case of shared/data/golden_trl_losses.json (computed by TRL 1.16's own code) reproduced to
float32 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dpobench
from dpobench import LogProbs

# A verbatim copy of shared/data/golden_trl_losses.json, so that a checkout alone runs the tests.
GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_trl_losses.json").read_text())

# TRL (loss_type, params) -> dpobench (variant, params). The map is the test: a wrong mapping fails.
F_DIVERGENCE = {"forward_kl": "forward_kl", "js_divergence": "js_divergence", "alpha_divergence": "alpha_divergence"}


def dpobench_variant(case: dict) -> tuple[str, dict]:
    trl, params = case["trl"], dict(case["params"])
    if trl == ["sigmoid", "sft"]:
        assert params.pop("loss_weights") == [1.0, 1.0]
        return "rpo", params
    if trl == ["sigmoid", "bco_pair", "sft"]:
        assert params.pop("loss_weights") == [0.8, 0.2, 1.0]
        return "mpo", params
    if "f_divergence_type" in params:
        # TRL's default f_alpha_divergence_coef 0.5 is α_paper = 1 − 0.5 = 0.5.
        return "dpo", {"f_divergence": F_DIVERGENCE[params.pop("f_divergence_type")], **params}
    if trl == "cpo:sigmoid":
        return "cpo", params
    if trl == "cpo:simpo":
        if params:  # the official SimPO recipe: beta 2, gamma 0.5, no NLL
            return "simpo", {"beta": params["beta"], "gamma": params["simpo_gamma"], "sft_weight": params["cpo_alpha"]}
        return "simpo_trl", {}
    renamed = {"sigmoid": "dpo", "robust": "robust_dpo"}
    return renamed.get(trl, trl), params


def batch(dtype=torch.float32) -> tuple[LogProbs, LogProbs]:
    x = {k: torch.tensor(v, dtype=dtype) for k, v in GOLDEN["inputs"].items()}
    policy = LogProbs(x["pc"], x["pr"], x["lc"], x["lr"])
    reference = LogProbs(x["rc"], x["rr"], x["lc"], x["lr"])
    return policy, reference


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["case"] for c in GOLDEN["cases"]])
def test_matches_trl(case: dict) -> None:
    name, params = dpobench_variant(case)
    loss = dpobench.get_loss(name, **params)
    out = loss(*batch())
    # rtol 1e-5 ≈ 80 float32 ulps relative: TRL's own sums differ from the stored inputs by an ulp, and
    # squared losses (sppo_hard, ipo) amplify that. A wrong formula is off by far more.
    torch.testing.assert_close(out.losses.float(), torch.tensor(case["losses"]), rtol=1e-5, atol=1e-6)
    assert out.losses.mean().item() == pytest.approx(case["mean_loss"], rel=1e-5, abs=1e-6)
    if name == "sft":
        # dpobench's `sft` is reference-free, so its rewards are β·pc (TRL ran a reference and reported β·Δ).
        policy, _ = batch()
        torch.testing.assert_close(out.chosen_rewards, case["params"].get("beta", 0.1) * policy.chosen)
        return
    # TRL summed its per-token log-probs itself: its sums may differ from the stored ones by an ulp of
    # |log p| (3.8e-6 near 50), which the rewards scale by β. That is the float32 rounding allowed.
    beta = loss.hparams["beta"]
    ulp = torch.finfo(torch.float32).eps * max(max(map(abs, v)) for v in GOLDEN["inputs"].values())
    for key in ("chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(out, key).float(), torch.tensor(case[key]), rtol=0, atol=2 * beta * ulp)


def test_every_trl_loss_type_is_covered() -> None:
    trl_types = {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    covered = {c["trl"] for c in GOLDEN["cases"] if isinstance(c["trl"], str)}
    assert trl_types <= covered
    names = {dpobench_variant(c)[0] for c in GOLDEN["cases"]}
    assert names <= set(dpobench.get_losses())


# LD-DPO: TRL computes it inside its training step from per-token log-probs (tests/data/make_golden_trl_ld_dpo.py).
GOLDEN_LD = json.loads((Path(__file__).parent / "data" / "golden_trl_ld_dpo.json").read_text())


def per_token_batch(side: str) -> LogProbs:
    """One side (policy or reference) of the LD-DPO golden inputs as LogProbs: rows 0..B−1 chosen, B..2B−1 rejected."""
    rows, lengths = GOLDEN_LD["inputs"][side], GOLDEN_LD["inputs"]["lengths"]
    width = max(lengths)
    table = torch.zeros(len(rows), width)
    for i, values in enumerate(rows):
        table[i, : len(values)] = torch.tensor(values)
    b = len(rows) // 2
    tokens = torch.tensor(lengths, dtype=torch.float32)
    return LogProbs(table[:b].sum(1), table[b:].sum(1), tokens[:b], tokens[b:], chosen_token_logps=table[:b],
                    rejected_token_logps=table[b:])  # fmt: skip


@pytest.mark.parametrize("case", GOLDEN_LD["cases"], ids=[c["case"] for c in GOLDEN_LD["cases"]])
def test_ld_dpo_matches_trl(case: dict) -> None:
    out = dpobench.get_loss("ld_dpo", **case["params"])(per_token_batch("policy"), per_token_batch("reference"))
    torch.testing.assert_close(out.losses, torch.tensor(case["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(case["chosen_rewards"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(case["rejected_rewards"]), rtol=1e-5, atol=1e-6)


def test_ld_dpo_at_alpha_one_is_dpo_and_the_golden_pairs_differ_otherwise() -> None:
    """α = 1 weighs every token alike (TRL's ld_alpha=1.0 case is DPO's loss on the same sums); a case at α < 1 moves
    the losses of the pairs of unequal lengths only (pair 0 has equal lengths)."""
    policy, reference = per_token_batch("policy"), per_token_batch("reference")
    dpo = dpobench.get_loss("dpo")(policy, reference).losses
    torch.testing.assert_close(dpobench.get_loss("ld_dpo", alpha=1.0)(policy, reference).losses, dpo)
    half = dpobench.get_loss("ld_dpo", alpha=0.5)(policy, reference).losses
    assert half[0] == pytest.approx(float(dpo[0]), rel=1e-6) and (half[1:] - dpo[1:]).abs().min() > 1e-3


# KTO and APO-zero (unpaired): TRL's KTOTrainer computes them in its step (tests/data/make_golden_trl_kto.py).
GOLDEN_KTO = json.loads((Path(__file__).parent / "data" / "golden_trl_kto.json").read_text())


def completions(side: str, rows: list[int]) -> dpobench.Completions:
    x = GOLDEN_KTO["inputs"]
    pick = lambda key: torch.tensor([sum(x[key][r]) for r in rows])  # noqa: E731
    return dpobench.Completions(pick(side), torch.tensor([float(x["lengths"][r]) for r in rows]),
                                torch.tensor([x["labels"][r] for r in rows]), pick(f"{side}_kl"))  # fmt: skip


@pytest.mark.parametrize("case", GOLDEN_KTO["cases"], ids=[c["case"] for c in GOLDEN_KTO["cases"]])
def test_unpaired_losses_match_trl(case: dict) -> None:
    """The batch's mean loss and each side's mean reward, and each example's loss as a batch of its own."""
    name = {"kto": "kto", "apo_zero_unpaired": "apo_zero_unpaired"}[case["trl"]]
    loss = dpobench.get_loss(name, **case["params"])
    everything = list(range(len(GOLDEN_KTO["inputs"]["labels"])))
    out = loss(completions("policy", everything), completions("reference", everything))
    assert out.losses.mean().item() == pytest.approx(case["mean_loss"], rel=1e-5, abs=1e-6)
    labels = torch.tensor(GOLDEN_KTO["inputs"]["labels"])
    assert out.rewards[labels].mean().item() == pytest.approx(case["mean_chosen_reward"], rel=1e-5, abs=1e-6)
    assert out.rewards[~labels].mean().item() == pytest.approx(case["mean_rejected_reward"], rel=1e-5, abs=1e-6)
    alone = [loss(completions("policy", [i]), completions("reference", [i])).losses.item() for i in everything]
    assert alone == pytest.approx(case["losses_alone"], rel=1e-5, abs=1e-6)


# BCO (unpaired, with its running reward shift): TRL 0.29's BCOTrainer.bco_loss (tests/data/make_golden_trl_bco.py).
GOLDEN_BCO = json.loads((Path(__file__).parent / "data" / "golden_trl_bco.json").read_text())


@pytest.mark.parametrize("case", GOLDEN_BCO["cases"], ids=[c["case"] for c in GOLDEN_BCO["cases"]])
def test_bco_matches_trl_over_consecutive_batches(case: dict) -> None:
    """Two training batches move the running shift δ (the second's losses use the mean of both batches' rewards),
    an evaluation batch leaves it; a reset starts it again from 0."""
    loss = dpobench.get_loss("bco", **case["params"])

    def run(b: dict, train: bool):
        logps = {k: torch.tensor(v, dtype=torch.float64) for k, v in b.items()}
        n_c, n_r = len(b["policy_chosen"]), len(b["policy_rejected"])
        desirable = torch.tensor([True] * n_c + [False] * n_r)
        side = lambda who: dpobench.Completions(  # noqa: E731
            torch.cat([logps[f"{who}_chosen"], logps[f"{who}_rejected"]]), torch.ones(n_c + n_r), desirable
        )
        loss.train(train)
        return loss(side("policy"), side("reference")), n_c

    for b, step in zip(GOLDEN_BCO["batches"], case["steps"], strict=True):
        out, n_c = run(b, step["train"])
        assert out.losses.tolist() == pytest.approx(step["losses"], rel=1e-5, abs=1e-6)
        assert out.rewards[:n_c].tolist() == pytest.approx(step["chosen_rewards"], rel=1e-5, abs=1e-6)
        assert float(loss.shift) == pytest.approx(step["delta"], rel=1e-5, abs=1e-7)
    loss.reset()
    first, _ = run(GOLDEN_BCO["batches"][0], True)
    assert first.losses.tolist() == pytest.approx(case["steps"][0]["losses"], rel=1e-5, abs=1e-6)


# TDPO is not in TRL: its official code's tdpo_loss made these (tests/data/make_golden_tdpo.py).
GOLDEN_TDPO = json.loads((Path(__file__).parent / "data" / "golden_tdpo.json").read_text())


@pytest.mark.parametrize("case", GOLDEN_TDPO["cases"], ids=[c["case"] for c in GOLDEN_TDPO["cases"]])
def test_tdpo_matches_its_official_code(case: dict) -> None:
    x = {k: torch.tensor(v) for k, v in GOLDEN_TDPO["inputs"].items()}
    n = len(x["chosen_logps_margin"])
    tokens, base = torch.full((n,), 7.0), torch.full((n,), -20.0)
    reference = LogProbs(base, base, tokens, tokens)
    policy = LogProbs(base + x["chosen_logps_margin"], base + x["rejected_logps_margin"], tokens, tokens,
                      chosen_token_kl=x["chosen_position_kl"], rejected_token_kl=x["rejected_position_kl"])  # fmt: skip
    out = dpobench.get_loss("tdpo", **case["params"])(policy, reference)
    torch.testing.assert_close(out.losses, torch.tensor(case["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(case["chosen_rewards"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(case["rejected_rewards"]), rtol=1e-5, atol=1e-6)


def test_tdpo2_takes_no_gradient_through_the_chosen_kl() -> None:
    """TDPO2 stops the gradient of the chosen answer's KL (sg(D_c)); TDPO1 lets both through."""
    t = lambda v: torch.tensor([v], requires_grad=True)  # noqa: E731
    for tdpo1, expect_grad in ((False, False), (True, True)):
        kl_c, kl_r = t(0.3), t(0.7)
        one = torch.tensor([1.0])
        policy = LogProbs(torch.tensor([-10.0]), torch.tensor([-12.0]), one, one, chosen_token_kl=kl_c,
                          rejected_token_kl=kl_r)  # fmt: skip
        reference = LogProbs(torch.tensor([-11.0]), torch.tensor([-11.0]), one, one)
        dpobench.get_loss("tdpo", tdpo1=tdpo1)(policy, reference).losses.sum().backward()
        assert (kl_c.grad is not None and float(kl_c.grad) != 0) == expect_grad and float(kl_r.grad) != 0
