"""The conformance checker: every registered variant passes it, and each check can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dpobench
from dpobench import LogProbs, LossOutput, Param, PreferenceLoss
from dpobench.losses import log_ratios
from dpobench.testing import assert_loss_contract, check_loss, make_batch

ALL_VARIANTS = sorted(dpobench.get_losses())


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_registered_variant_passes(name: str) -> None:
    assert_loss_contract(name)


@pytest.mark.parametrize(
    ("name", "params"),
    [("dpo", {"f_divergence": "forward_kl", "beta": 1.0}), ("discopop", {"f_divergence": "alpha_divergence"}),
     ("seed_custom_dpo", {"length_normalization": False}), ("cpo", {"label_smoothing": 0.2})],
)  # fmt: skip
def test_non_default_parameters_pass(name: str, params: dict) -> None:
    assert_loss_contract(name, **params)


class _Base(PreferenceLoss):
    """Test loss (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = −logσ(β·h)

    Args:
        beta: β.
    """

    name = "test_loss"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": Param(0.1, "(0, inf)", "β")}

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        return LossOutput(-F.logsigmoid(self.beta * (dc - dr)), (self.beta * dc).detach(), (self.beta * dr).detach())


def failure(cls: type[PreferenceLoss], check: str) -> str:
    report = check_loss(cls)
    assert report.ok is False, f"{cls.__name__} passed every check"
    return next(r.message for r in report.results if r.check == check and not r.ok)


def test_a_correct_class_passes() -> None:
    assert check_loss(_Base).ok


def test_attached_rewards_fail() -> None:
    class Attached(_Base):
        def forward(self, policy, reference, **extras):
            dc, dr = log_ratios(policy, reference)
            return LossOutput(-F.logsigmoid(self.beta * (dc - dr)), self.beta * dc, self.beta * dr)

    assert "chosen_rewards and rejected_rewards carry a gradient" in failure(Attached, "rewards detached")


def test_detached_policy_fails() -> None:
    class Detached(_Base):
        def forward(self, policy, reference, **extras):
            out = super().forward(policy.detach(), reference)
            return LossOutput(out.losses.detach(), out.chosen_rewards, out.rejected_rewards)

    message = failure(Detached, "gradients reach the policy, not the reference")
    assert message == "losses carry no gradient: do not detach the policy log-probs"


def test_gradient_into_the_reference_fails() -> None:
    class Leaky(_Base):
        def __call__(self, policy, reference=None, **extras):  # bypasses the base class's detach
            return self.forward(policy, reference)

    message = failure(Leaky, "gradients reach the policy, not the reference")
    assert message == "the reference log-probs receive a gradient: the reference must stay frozen"


def test_overflow_at_extreme_inputs_fails() -> None:
    class Overflowing(_Base):
        def forward(self, policy, reference, **extras):
            dc, dr = log_ratios(policy, reference)
            losses = torch.exp(-self.beta * (dc - dr))  # e^(0.1·2e4) = inf
            return LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())

    assert "non-finite value(s)" in failure(Overflowing, "finite at extreme inputs")


def test_a_false_monotone_claim_fails() -> None:
    class Target(_Base):  # IPO-like, but claims monotone
        def forward(self, policy, reference, **extras):
            dc, dr = log_ratios(policy, reference)
            return LossOutput(
                (dc - dr - 1 / (2 * self.beta)) ** 2, (self.beta * dc).detach(), (self.beta * dr).detach()
            )

    assert "set `monotone = False`" in failure(Target, "loss falls as the margin grows")


def test_a_loss_that_reads_the_rest_of_the_batch_must_say_so() -> None:
    """A pair's loss that moves with the other pairs (here: margins centred on the batch's mean) fails unless the
    variant declares ``batch_coupled``; declared, the check is skipped."""

    class Centred(_Base):
        def forward(self, policy, reference, **extras):
            dc, dr = log_ratios(policy, reference)
            h = dc - dr
            return LossOutput(
                -F.logsigmoid(self.beta * (h - h.mean())), (self.beta * dc).detach(), (self.beta * dr).detach()
            )

    message = failure(Centred, "a pair's loss is its own")
    assert message.startswith("pair 0's losses went from ") and message.endswith(
        "when only the other pairs of the batch changed; a variant whose losses depend on the rest of the batch "
        "declares `batch_coupled = True`"
    )

    class Declared(Centred):
        batch_coupled = True

    result = next(r for r in check_loss(Declared).results if r.check == "a pair's loss is its own")
    assert (result.ok, result.skipped, result.message) == (True, True, "not claimed (batch_coupled = True)")


def test_the_batch_coupled_built_ins_are_those_with_a_batch_wide_term() -> None:
    """AOT sorts the batch; TRL's NLL term on chosen is the batch's token mean, the same for every pair, so every
    variant that adds it is coupled (the contract check found cpo, orpo, sft, simpo_trl, rpo, mpo undeclared); paired
    KTO's reference points are batch means, and KTO's KL estimate; β-DPO's β and filter are the batch's, as BCO's
    running reward shift is partly."""
    coupled = {name for name in ALL_VARIANTS if dpobench.get_loss(name).batch_coupled}
    assert coupled == {"aot", "aot_unpaired", "bco", "beta_dpo", "combined", "cpo", "kto", "kto_pair", "mpo", "orpo",
                       "rpo", "sft", "simpo_trl"}  # fmt: skip
    assert not dpobench.get_loss("cpo", cpo_alpha=0.0).batch_coupled  # no NLL term, nothing shared
    assert dpobench.get_loss("simpo", sft_weight=0.5).batch_coupled


def test_bfloat16_drift_fails() -> None:
    class PrecisionSensitive(_Base):
        def forward(self, policy, reference, **extras):
            out = super().forward(policy, reference)
            if policy.chosen.dtype == torch.bfloat16:  # a wrong branch only bf16 takes
                return LossOutput(out.losses * 2, out.chosen_rewards, out.rejected_rewards)
            return out

    assert "more than 5% apart" in failure(PrecisionSensitive, "bfloat16 agrees with float32")


def test_docstring_convention_fails_without_arxiv_formula_or_args() -> None:
    class NoArxiv(_Base):
        """A loss with no citation.

        Formula:
            ℓ = 0

        Args:
            beta: β.
        """

    class NoArgs(_Base):
        """Test loss (https://arxiv.org/abs/2305.18290).

        Formula:
            ℓ = −logσ(β·h)
        """

    class Bare(_Base):
        """A loss with nothing."""

        paper = ""
        params = {"beta": Param(0.1, "(0, inf)", "β"), "gamma": Param(0.0, "[0, 1]", "γ")}

    assert "first line must cite the paper" in failure(NoArxiv, "docstring convention")
    assert "does not describe beta" in failure(NoArgs, "docstring convention")
    assert failure(Bare, "docstring convention") == (  # every problem at once
        "the docstring's first line must cite the paper as https://arxiv.org/abs/NNNN.NNNNN; the docstring needs a "
        "'Formula:' section with the per-pair loss; the docstring's 'Args:' section does not describe beta, gamma; "
        "set the class attribute `paper` to the paper's URL"
    )


def test_unvalidated_parameter_fails() -> None:
    class NoValidation(_Base):
        def __init__(self, **hparams):  # skips the base class's validation
            torch.nn.Module.__init__(self)
            self.beta = hparams.get("beta", 0.1)
            self.hparams = {"beta": self.beta}

    assert "beta=0.0 is outside (0, inf) but building the loss accepted it" in failure(
        NoValidation, "parameters declared and validated"
    )


@pytest.mark.parametrize("declared", [False, True])
def test_per_token_statistics_come_as_training_gives_them(declared: bool) -> None:
    """The check filled *_logsumsq on policy and reference for every variant; training fills the policy's only,
    and only for variants that declare "logsumsq". A variant that read them undeclared, or read the reference's,
    passed the check and failed its first training step."""

    class ReadsStatistics(_Base):
        inputs = frozenset({"logsumsq"}) if declared else frozenset()

        def forward(self, policy, reference, **extras):
            source = reference if declared else policy  # declared: it reads the reference's, which never exist
            dc, dr = log_ratios(policy, reference)
            shift = source.chosen_logsumsq - source.rejected_logsumsq
            return LossOutput(-F.logsigmoid(self.beta * (dc - dr) + 0 * shift), (self.beta * dc).detach(),
                              (self.beta * dr).detach())  # fmt: skip

    report = check_loss(ReadsStatistics)
    assert not report.ok and "NoneType" in " ".join(r.message for r in report.results if not r.ok)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_loss_in_its_own_precision_fails(dtype: torch.dtype) -> None:
    """bfloat16 losses for float32 inputs passed every check (within the bf16 check's 5 %) and trained."""

    class OwnPrecision(_Base):
        def forward(self, policy, reference, **extras):
            out = super().forward(policy, reference, **extras)
            return LossOutput(out.losses.to(dtype), out.chosen_rewards, out.rejected_rewards)

    assert failure(OwnPrecision, "shapes and finite values") == (
        f"losses has dtype {dtype} for torch.float32 inputs; compute in the inputs' dtype"
    )


def test_make_batch_is_deterministic_and_plausible() -> None:
    a, _, inputs = make_batch(16, seed=7)
    b, _, _ = make_batch(16, seed=7)
    assert torch.equal(a.chosen, b.chosen)
    w, margin = inputs["weights"], inputs["margin"]
    assert (a.chosen < 0).all() and (a.chosen_tokens >= 1).all() and ((w > 0) & (w <= 1)).all()
    assert ((margin > 0) & (margin <= 2)).all()
    # per-token log-probs: each row's tokens carry its sum, evenly, and nothing after them
    for sums, per_token, tokens in ((a.chosen, a.chosen_token_logps, a.chosen_tokens),
                                    (a.rejected, a.rejected_token_logps, a.rejected_tokens)):  # fmt: skip
        torch.testing.assert_close(per_token.sum(1), sums)
        assert per_token.shape == (16, 64)
        for row, count in zip(per_token, tokens.long().tolist(), strict=True):
            assert (row[:count] == row[0]).all() and (row[count:] == 0).all()


def test_logprobs_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"LogProbs.rejected has 3 rows but LogProbs.chosen has 2"):
        LogProbs(torch.zeros(2), torch.zeros(3), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"LogProbs.chosen must have shape \(B,\), got \(2, 5\)"):
        LogProbs(torch.zeros(2, 5), torch.zeros(2), torch.ones(2), torch.ones(2))
    two = torch.zeros(2)
    with pytest.raises(ValueError, match=r"LogProbs.chosen_token_logps must have shape \(B, L\), got \(2,\)"):
        LogProbs(two, two, two, two, chosen_token_logps=two)
    with pytest.raises(
        ValueError, match=r"chosen_token_logps has shape \(2, 4\) but rejected_token_logps has \(2, 5\)"
    ):
        LogProbs(two, two, two, two, chosen_token_logps=torch.zeros(2, 4), rejected_token_logps=torch.zeros(2, 5))
