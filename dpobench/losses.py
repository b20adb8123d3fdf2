"""The loss contract: what a preference-loss variant receives, returns and declares.

A variant is a small ``PreferenceLoss`` subclass. The harness hands it per-sequence log-probs
(``LogProbs``) of the policy and, unless the variant is reference-free, of the reference model;
it returns a ``LossOutput`` of per-pair losses and detached implicit rewards, each shape (B,).
Hyper-parameters are declared as ``Param`` objects with defaults and valid ranges and are checked
when the loss is built, so β ≤ 0 is an error at construction, not a NaN three hours later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KL_LOGPS",
    "MOVING_REFERENCE",
    "PAIR_INPUTS",
    "TOKEN_KL",
    "TOKEN_LOGPS",
    "Completions",
    "LabelSmoothingMixin",
    "LogProbs",
    "LossOutput",
    "Param",
    "ParamError",
    "PreferenceLoss",
    "UnpairedLoss",
    "UnpairedOutput",
    "call_loss",
    "call_unpaired_loss",
    "check_unpaired_output",
    "chosen_nll",
    "implicit_rewards",
    "log_ratios",
    "resolve_params",
    "smoothed_logsigmoid_loss",
]


class ParamError(ValueError):
    """A hyper-parameter is unknown, of the wrong type or outside its valid range."""


@dataclass(frozen=True)
class LogProbs:
    """Per-sequence log-probs of one model on a batch of B preference pairs.

    Args:
        chosen: log π(y_c|x), **summed** over completion tokens (prompt masked), shape (B,).
        rejected: log π(y_r|x), summed the same way, shape (B,).
        chosen_tokens: number of completion tokens of each chosen response, shape (B,).
        rejected_tokens: same for the rejected responses, shape (B,).
        chosen_logsumsq: optional Σ_t log Σ_v π(v|x, y_<t)² over chosen completion tokens, shape (B,);
            filled only for variants that declare ``"logsumsq"`` in ``inputs`` (WPO weighting).
        rejected_logsumsq: same for the rejected responses.
        chosen_token_logps: optional per-token log π(y_t|x, y_<t) of the chosen completions, shape (B, L), each row
            right-padded with 0 after its ``chosen_tokens`` entries (so a row sums to ``chosen``); L is the same for
            chosen and rejected, policy and reference. Filled, for the policy and the reference, only for variants
            that declare ``"token_logps"`` in ``inputs`` (LD-DPO, SamPO).
        rejected_token_logps: same for the rejected completions, shape (B, L).
        chosen_token_kl: optional Σ_t KL(π_ref(·|x, y_<t) ‖ π(·|x, y_<t)) over chosen completion tokens, each term
            over the whole vocabulary, shape (B,), with its gradient: the policy's sequential KL from the reference
            (TDPO). Filled, on the policy's side only, for variants that declare ``"token_kl"`` in ``inputs``; it
            costs a reference forward pass per step.
        rejected_token_kl: same for the rejected responses.

    Each pair of optional fields ``chosen_<name>`` / ``rejected_<name>`` is one input a variant declares in
    ``inputs`` by its name: the policy's statistics (``STATISTICS``), ``TOKEN_LOGPS`` and ``TOKEN_KL``.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_logsumsq: Tensor | None = None
    rejected_logsumsq: Tensor | None = None
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None
    chosen_token_kl: Tensor | None = None
    rejected_token_kl: Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"LogProbs.{f.name} must be a torch.Tensor, got {type(value).__name__}")
            per_token = f.name.endswith("_token_logps")
            if value.dim() != (2 if per_token else 1):
                raise ValueError(f"LogProbs.{f.name} must have shape {'(B, L)' if per_token else '(B,)'}, "
                                 f"got {tuple(value.shape)}")  # fmt: skip
            if value.shape[0] != self.chosen.shape[0]:
                raise ValueError(
                    f"LogProbs.{f.name} has {value.shape[0]} rows but LogProbs.chosen has {self.chosen.shape[0]}"
                )
        if self.chosen_token_logps is not None and self.rejected_token_logps is not None:
            if self.chosen_token_logps.shape != self.rejected_token_logps.shape:
                raise ValueError(f"LogProbs.chosen_token_logps has shape {tuple(self.chosen_token_logps.shape)} but "
                                 f"rejected_token_logps has {tuple(self.rejected_token_logps.shape)}")  # fmt: skip

    @classmethod
    def from_rows(cls, sums: Tensor, tokens: Tensor, statistics: dict[str, Tensor] | None = None) -> LogProbs:
        """From per-sequence rows in the harness's order, the B chosen responses then the B rejected ones."""
        b = sums.shape[0] // 2
        split = {f"{side}_{name}": half for name, values in (statistics or {}).items()
                 for side, half in (("chosen", values[:b]), ("rejected", values[b:]))}  # fmt: skip
        return cls(sums[:b], sums[b:], tokens[:b], tokens[b:], **split)

    @property
    def batch_size(self) -> int:
        return self.chosen.shape[0]

    def without(self, statistics: Iterable[str]) -> LogProbs:
        """These log-probs less the named statistics; themselves where they hold none of them (no copy)."""
        drop = {f"{side}_{name}": None for name in statistics for side in ("chosen", "rejected")
                if getattr(self, f"{side}_{name}") is not None}  # fmt: skip
        return replace(self, **drop) if drop else self

    def with_even_tokens(self, width: int | None = None) -> LogProbs:
        """These log-probs with per-token log-probs made by spreading each sum evenly over its tokens (width L:
        ``width``, or the most tokens of any sequence). For what has only sums (the contract check's batches, the loss
        landscape); the per-token values are differentiable functions of the sums, so gradients reach ``chosen``."""
        counts = torch.cat([self.chosen_tokens, self.rejected_tokens]).round().long().clamp(min=1)
        width = width or int(counts.max())
        mask = (torch.arange(width, device=counts.device)[None, :] < counts[:, None]).to(self.chosen.dtype)
        each = torch.cat([self.chosen, self.rejected])[:, None] / counts[:, None].to(self.chosen.dtype) * mask
        b = self.batch_size
        return replace(self, chosen_token_logps=each[:b], rejected_token_logps=each[b:])

    def with_token_kl(self, reference: LogProbs) -> LogProbs:
        """These (policy) log-probs with a sequential KL from ``reference`` made up from the sums: ½·Δ²/|y| per
        completion (Δ the log-ratio), the second-order KL of two distributions whose log-ratio is spread evenly over
        the tokens. For what has only sums (the contract check's batches, the loss landscape): non-negative, 0 where
        the models agree, and differentiable in the policy's sums, as the real one is in the policy."""
        kl = {f"{side}_token_kl": 0.5 * (getattr(self, side) - getattr(reference, side).detach()) ** 2
              / getattr(self, f"{side}_tokens").clamp(min=1) for side in ("chosen", "rejected")}  # fmt: skip
        return replace(self, **kl)

    def detach(self) -> LogProbs:
        return LogProbs(*(None if v is None else v.detach() for v in self._values()))

    def to(self, dtype: torch.dtype) -> LogProbs:
        """The same log-probs cast to ``dtype`` (token counts included, as the harness passes them)."""
        return LogProbs(*(None if v is None else v.to(dtype) for v in self._values()))

    def _values(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


#: the per-token log-probs of policy and reference (``LogProbs.chosen_token_logps`` / ``rejected_token_logps``), as an
#: input a variant declares: its policy side carries the gradient, and the reference side is cached per token
TOKEN_LOGPS = "token_logps"
#: the policy's sequential KL from the reference over the vocabulary (``LogProbs.chosen_token_kl``), as an input a
#: variant declares: computed with its gradient from a reference forward pass in the step
TOKEN_KL = "token_kl"
#: the per-sequence statistics of the policy a variant can declare in ``inputs``: the names of LogProbs's other
#: optional field pairs, constants of the loss (no gradient). The harness computes only those declared
#: (``dpobench.logprobs.TOKEN_STATISTICS`` holds each one's computation from the logits)
STATISTICS: tuple[str, ...] = tuple(
    f.name.removeprefix("chosen_")
    for f in fields(LogProbs)
    if f.name.startswith("chosen_") and f.name not in ("chosen_tokens", f"chosen_{TOKEN_LOGPS}", f"chosen_{TOKEN_KL}")
)
#: the per-pair inputs from the data, each a ``forward`` keyword argument of shape (B,): ``weights``, the labeller's
#: confidence in (0.5, 1]; ``margin``, by how much the labeller scored the chosen completion over the rejected one
#: (the synthetic task's gold difference, or a data file's ``margin`` / ``score_chosen`` − ``score_rejected``)
PAIR_INPUTS: tuple[str, ...] = ("weights", "margin")
#: the log-probs of mismatched completions an unpaired variant declares for KTO's KL estimate (``Completions.kl_logps``)
KL_LOGPS = "kl_logps"
#: a reference that moves toward the policy during training (TR-DPO): the harness keeps a copy of the reference
#: model per cell, scores each batch with it (a reference pass per step, instead of the cached log-probs) and moves it
#: by ``PreferenceLoss.reference_mix(step)`` after each step
MOVING_REFERENCE = "moving_reference"
#: every input a variant can declare
KNOWN_INPUTS = frozenset({*PAIR_INPUTS, TOKEN_LOGPS, TOKEN_KL, KL_LOGPS, MOVING_REFERENCE, *STATISTICS})


def sequence_inputs(loss: PreferenceLoss) -> tuple[str, ...]:
    """What the harness computes with the policy's summed log-probs for ``loss``: the statistics it declares, in
    ``STATISTICS`` order, then ``TOKEN_LOGPS`` and ``TOKEN_KL`` if it declares them."""
    return tuple(name for name in (*STATISTICS, TOKEN_LOGPS, TOKEN_KL) if name in loss.inputs)


class LossOutput(NamedTuple):
    """Per-pair losses (not reduced: the harness averages) and detached implicit rewards, each (B,)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class Completions:
    """Per-completion log-probs of one model on a batch of N unpaired examples (a prompt, one completion, and whether
    it is desirable): what an ``UnpairedLoss`` receives.

    Args:
        logps: log π(y|x) summed over completion tokens, shape (N,).
        tokens: completion tokens of each example, shape (N,).
        desirable: the labels, bool, shape (N,).
        kl_logps: optional log π(y'|x) of mismatched completions, example i's prompt with another example's
            completion (KTO's KL estimate), shape (N,); filled only for variants that declare ``"kl_logps"`` in
            ``inputs``. The policy's carry no gradient (as in TRL).
    """

    logps: Tensor
    tokens: Tensor
    desirable: Tensor
    kl_logps: Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dim() != 1 or value.shape != self.logps.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Completions.{f.name} must be a tensor of shape (N,) like logps, got {shape}")
        if self.desirable.dtype != torch.bool:
            raise ValueError(f"Completions.desirable must be bool, got {self.desirable.dtype}")

    def detach(self) -> Completions:
        return Completions(*(None if v is None else (v.detach() if v.is_floating_point() else v)
                             for v in (getattr(self, f.name) for f in fields(self))))  # fmt: skip

    @classmethod
    def unrolled(cls, pairs: LogProbs) -> Completions:
        """A batch of pairs as 2B examples, the chosen completions desirable and the rejected ones not; the
        mismatched log-probs are those of the completions rotated by one (TRL's rotation), under their own prompts:
        for the contract check, the loss landscape and held-out rewards, which have pairs' log-probs only."""
        logps = torch.cat([pairs.chosen, pairs.rejected])
        desirable = torch.cat([torch.ones(pairs.batch_size), torch.zeros(pairs.batch_size)]).bool()
        return cls(logps, torch.cat([pairs.chosen_tokens, pairs.rejected_tokens]), desirable.to(logps.device),
                   torch.roll(logps, 1).detach())  # fmt: skip


class UnpairedOutput(NamedTuple):
    """Per-example losses (not reduced) and detached implicit rewards, each (N,)."""

    losses: Tensor
    rewards: Tensor


_INTERVAL = re.compile(r"^\s*([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Param:
    """A declared hyper-parameter: default, valid values and a one-line meaning.

    ``valid`` is an interval written as in mathematics, ``"(0, inf)"`` or ``"[0, 0.5)"``, for numbers,
    or a tuple of allowed values (``("reverse_kl", "js")``). Booleans need no ``valid``.
    """

    default: Any
    valid: str | tuple[Any, ...] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.valid, str) and not _INTERVAL.match(self.valid):
            raise ValueError(f"Param valid={self.valid!r} is not an interval such as '(0, inf)' or '[0, 0.5)'")

    def describe(self) -> str:
        if isinstance(self.valid, tuple):
            return "one of " + ", ".join(map(str, self.valid))
        if isinstance(self.valid, str):
            return self.valid.strip()
        return type(self.default).__name__

    def check(self, key: str, value: Any, owner: str) -> Any:
        """Return ``value`` coerced to the declared type, or raise ``ParamError`` saying what is wrong."""
        where = f"{owner}: parameter {key}={value!r}"
        default = self.default
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
                value = value.lower() in {"true", "1", "yes"}
            if not isinstance(value, bool):
                raise ParamError(f"{where} must be true or false")
            return value
        if isinstance(self.valid, tuple):
            if isinstance(value, str) and value not in self.valid:  # from the command line: "2" for 2 (or 2.0)
                value = next((v for v in self.valid if _same_number(value, v)), value)
            if value not in self.valid:
                raise ParamError(f"{where} must be one of {', '.join(map(repr, self.valid))}")
            return value
        if isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ParamError(f"{where} must be a number")
            try:
                number = float(value)
            except ValueError:
                raise ParamError(f"{where} must be a number") from None
            if isinstance(default, int) and not number.is_integer():
                raise ParamError(f"{where} must be an integer")
            if math.isnan(number):
                raise ParamError(f"{where} must be a number, not NaN")
            if isinstance(self.valid, str):
                m = _INTERVAL.match(self.valid)
                assert m is not None
                lo_br, lo, hi, hi_br = m.groups()
                low, high = float(lo), float(hi)
                ok_low = number > low or (lo_br == "[" and number == low)
                ok_high = number < high or (hi_br == "]" and number == high)
                if not (ok_low and ok_high):
                    raise ParamError(f"{where} is outside its valid range {self.valid.strip()}")
            return int(number) if isinstance(default, int) else number
        return value


def resolve_params(params: dict[str, Param], given: dict[str, Any], owner: str) -> dict[str, Any]:
    """The defaults of ``params`` overlaid with ``given``, each value checked against its declaration; ``owner``
    names whose parameters they are in an error."""
    unknown = sorted(set(given) - set(params))
    if unknown:
        valid = ", ".join(sorted(params)) or "none"
        raise ParamError(f"{owner}: unknown parameter {unknown[0]!r} (valid parameters: {valid})")
    values = {key: p.default for key, p in params.items()}
    for key, value in given.items():
        values[key] = params[key].check(key, value, owner)
    return values


def _same_number(text: str, value: Any) -> bool:
    """Whether ``text`` (from the command line) names the number ``value``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return float(text) == float(value)
    except ValueError:
        return False


class PreferenceLoss(nn.Module):
    """Base class of every preference-loss variant.

    Subclasses set the class attributes below and implement ``forward(policy, reference, **extras)``
    returning a ``LossOutput``. ``reference`` is ``None`` for reference-free variants. Extras (such
    as per-pair confidence ``weights``) are passed only when named in ``inputs``.
    """

    #: lower snake-case id, unique across all plugins
    name: ClassVar[str] = ""
    #: the paper (arXiv URL) the variant comes from
    paper: ClassVar[str] = ""
    #: True when the loss never looks at the reference model (the harness then skips it)
    reference_free: bool = False
    #: True when a pair's loss depends on the other pairs of the batch (AOT sorts the batch)
    batch_coupled: bool = False
    #: True when the loss does not increase as the chosen-over-rejected margin grows
    monotone: bool = True
    #: True for an ``UnpairedLoss``: it trains on unpaired examples (``Completions``), not pairs
    unpaired: ClassVar[bool] = False
    #: extra inputs the variant needs, of ``KNOWN_INPUTS``: per-pair data (``PAIR_INPUTS``), per-token log-probs
    #: (``TOKEN_LOGPS``) or a statistic of the policy (``STATISTICS``)
    inputs: frozenset[str] = frozenset()
    #: hyper-parameters, with defaults and valid ranges
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams = self.resolve_params(hparams)
        for key, value in self.hparams.items():
            setattr(self, key, value)

    @classmethod
    def resolve_params(cls, given: dict[str, Any], *, owner: str | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given``, each value checked against its declaration."""
        return resolve_params(cls.params, given, owner or f"loss {cls.name!r}")

    def __call__(self, policy: LogProbs, reference: LogProbs | None = None, **extras: Tensor) -> LossOutput:
        if not isinstance(policy, LogProbs):
            raise TypeError(f"loss {self.name!r}: policy must be dpobench.LogProbs, got {type(policy).__name__}")
        if self.reference_free:
            reference = None
        elif reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs (it is not reference-free)")
        else:
            # The reference model is frozen: no gradient may reach it, whatever the variant does with it.
            reference = reference.detach()
        if TOKEN_KL in self.inputs and policy.chosen_token_kl is None:
            raise ValueError(f"loss {self.name!r} reads the policy's sequential KL from the reference: give its "
                             "chosen_token_kl and rejected_token_kl")  # fmt: skip
        if TOKEN_LOGPS in self.inputs:
            for side, given in (("policy", policy), ("reference", reference)):
                if given is not None and given.chosen_token_logps is None:
                    raise ValueError(f"loss {self.name!r} reads per-token log-probs: give the {side}'s "
                                     "chosen_token_logps and rejected_token_logps (LogProbs.with_even_tokens() makes "
                                     "them from sums)")  # fmt: skip
        out = super().__call__(policy, reference, **extras)
        return out if isinstance(out, LossOutput) else LossOutput(*out)

    def reference_mix(self, step: int) -> float:
        """For a variant that declares ``"moving_reference"``: how far the reference moves toward the policy after
        optimizer step ``step`` (1, 2, …), m in [0, 1]: π_ref ← (1 − m)·π_ref + m·π_θ, parameter by parameter (0: it
        stays). Other variants are never asked."""
        return 0.0

    def reset(self) -> None:
        """Forget what the loss carried from step to step (a stateful variant's running statistics, kept in buffers):
        the harness calls it as every cell starts, so that a cell's state is its own. Stateless variants have none."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class UnpairedLoss(PreferenceLoss):
    """Base class of the variants that train on unpaired examples (KTO, APO-zero unpaired): ``forward(policy,
    reference, **extras)`` receives ``Completions`` and returns an ``UnpairedOutput`` of per-example losses and
    detached rewards, each (N,).

    The harness trains them on examples (a paired sweep's pairs unrolled 1:1; an ``unpaired-D:U`` scenario's
    thinned examples), N per step as many completions as a paired step's 2B. Everywhere else that has pairs (the
    contract check, the loss landscape, held-out rewards), ``call_loss`` gives them the pairs unrolled
    (``Completions.unrolled``) and reads a pair's loss as the mean of its two examples' and its rewards as theirs.
    """

    unpaired = True

    def __call__(self, policy: Completions, reference: Completions | None = None, **extras: Tensor) -> UnpairedOutput:  # type: ignore[override]
        if not isinstance(policy, Completions):
            raise TypeError(f"loss {self.name!r}: policy must be dpobench.Completions, got {type(policy).__name__}")
        if reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs")
        reference = reference.detach()  # frozen, whatever the variant does with it
        if KL_LOGPS in self.inputs and (policy.kl_logps is None or reference.kl_logps is None):
            raise ValueError(f"loss {self.name!r} reads the log-probs of mismatched completions: give the policy's and "
                             "the reference's kl_logps")  # fmt: skip
        out = nn.Module.__call__(self, policy, reference, **extras)
        return out if isinstance(out, UnpairedOutput) else UnpairedOutput(*out)


# --- shared arithmetic of the DPO family (pure functions; equation numbers refer to the DPO paper) ---


def log_ratios(policy: LogProbs, reference: LogProbs) -> tuple[Tensor, Tensor]:
    """Δc = log π(y_c)/π_ref(y_c), Δr = log π(y_r)/π_ref(y_r)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def implicit_rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """β·chosen, β·rejected, detached: the implicit rewards of eq. 5 when given Δc, Δr."""
    return (beta * chosen).detach(), (beta * rejected).detach()


#: where the losses clamp exp()'s argument (TRL clamps its exponentials at 80 too): finite in float32 and bf16
EXP_MAX = 80.0


def chosen_nll(policy: LogProbs) -> Tensor:
    """Token-level mean NLL over every chosen completion token of the batch, replicated per pair (TRL `sft`)."""
    nll = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
    return nll.expand(policy.batch_size)


class LabelSmoothingMixin:
    """For losses of the form −(1−ε)·logσ(z) − ε·logσ(−z): with ε > 0 the loss is smallest at the finite
    margin z = log((1−ε)/ε), not at infinity, so the instance does not claim ``monotone``."""

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)  # type: ignore[call-arg]
        self.monotone = self.label_smoothing == 0  # type: ignore[attr-defined]


def smoothed_logsigmoid_loss(z: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): cDPO's conservative loss; ε = 0 gives DPO's −logσ(z)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def call_loss(
    loss: PreferenceLoss, policy: LogProbs, reference: LogProbs | None, **pair_inputs: Tensor | None
) -> LossOutput:
    """Call ``loss`` the way the harness does: the per-pair inputs (``PAIR_INPUTS``, by keyword) and the optional
    fields of ``LogProbs`` only when the variant declares them. The statistics (``STATISTICS``) are the policy's
    alone: training computes nothing else, so the contract check and the landscape give nothing else either."""
    extras = {k: v for k, v in pair_inputs.items() if k in loss.inputs and v is not None}
    if loss.unpaired:
        assert reference is not None
        out = loss(Completions.unrolled(policy), Completions.unrolled(reference), **extras)
        b = policy.batch_size
        check_unpaired_output(out, 2 * b)
        return LossOutput((out.losses[:b] + out.losses[b:]) / 2, out.rewards[:b], out.rewards[b:])
    policy = policy.without(s for s in (*STATISTICS, TOKEN_LOGPS, TOKEN_KL) if s not in loss.inputs)
    if reference is not None:
        reference = reference.without([*STATISTICS, TOKEN_KL, *([] if TOKEN_LOGPS in loss.inputs else [TOKEN_LOGPS])])
    return loss(policy, None if loss.reference_free else reference, **extras)


def call_unpaired_loss(loss: PreferenceLoss, policy: Completions, reference: Completions) -> UnpairedOutput:
    """Call an unpaired ``loss`` the way the harness does: the mismatched log-probs only if it declares them."""
    if KL_LOGPS not in loss.inputs:
        policy, reference = replace(policy, kl_logps=None), replace(reference, kl_logps=None)
    return loss(policy, reference)


def check_unpaired_output(out: Any, examples: int) -> None:
    """The harness's check of an unpaired loss's output: per-example tensors of shape (N,)."""
    for name, value in zip(("losses", "rewards"), out, strict=True):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (examples,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the loss returned {name} of shape {shape} for {examples} examples; expected ({examples},)"
            )


def check_output(out: Any, batch_size: int) -> None:
    """The harness's own contract check on every call: per-pair tensors of shape (B,)."""
    for name, value in zip(("losses", "chosen_rewards", "rejected_rewards"), out, strict=True):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch_size,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the loss returned {name} of shape {shape} for {batch_size} pairs; expected ({batch_size},)"
            )
