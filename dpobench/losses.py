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
    "LabelSmoothingMixin",
    "LogProbs",
    "LossOutput",
    "Param",
    "ParamError",
    "PreferenceLoss",
    "call_loss",
    "chosen_nll",
    "implicit_rewards",
    "log_ratios",
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

    The optional fields are the policy's per-sequence statistics (``STATISTICS``): each pair of fields
    ``chosen_<name>`` / ``rejected_<name>`` is one statistic a variant can declare in ``inputs`` by its name.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_logsumsq: Tensor | None = None
    rejected_logsumsq: Tensor | None = None

    def __post_init__(self) -> None:
        shape = None
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"LogProbs.{f.name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 1:
                raise ValueError(f"LogProbs.{f.name} must have shape (B,), got {tuple(value.shape)}")
            if shape is None:
                shape = value.shape
            elif value.shape != shape:
                raise ValueError(
                    f"LogProbs.{f.name} has shape {tuple(value.shape)} but LogProbs.chosen has {tuple(shape)}"
                )

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

    def detach(self) -> LogProbs:
        return LogProbs(*(None if v is None else v.detach() for v in self._values()))

    def to(self, dtype: torch.dtype) -> LogProbs:
        """The same log-probs cast to ``dtype`` (token counts included, as the harness passes them)."""
        return LogProbs(*(None if v is None else v.to(dtype) for v in self._values()))

    def _values(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


#: the per-sequence statistics of the policy a variant can declare in ``inputs``: the names of LogProbs's optional
#: field pairs. The harness computes only those declared (``dpobench.logprobs.TOKEN_STATISTICS`` holds each one's
#: computation from the logits)
STATISTICS: tuple[str, ...] = tuple(
    f.name.removeprefix("chosen_")
    for f in fields(LogProbs)
    if f.name.startswith("chosen_") and f.name != "chosen_tokens"
)
#: every input a variant can declare: per-pair confidence ``weights`` from the data (a ``forward`` argument), and
#: the statistics
KNOWN_INPUTS = frozenset({"weights", *STATISTICS})


def declared_statistics(loss: PreferenceLoss) -> tuple[str, ...]:
    """The statistics ``loss`` declares in ``inputs``, in ``STATISTICS`` order: what the harness computes for it."""
    return tuple(name for name in STATISTICS if name in loss.inputs)


class LossOutput(NamedTuple):
    """Per-pair losses (not reduced: the harness averages) and detached implicit rewards, each (B,)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


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
    #: extra inputs the variant needs, of ``KNOWN_INPUTS``: "weights" (per-pair confidence), or a statistic
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
        owner = owner or f"loss {cls.name!r}"
        unknown = sorted(set(given) - set(cls.params))
        if unknown:
            valid = ", ".join(sorted(cls.params)) or "none"
            raise ParamError(f"{owner}: unknown parameter {unknown[0]!r} (valid parameters: {valid})")
        values = {key: p.default for key, p in cls.params.items()}
        for key, value in given.items():
            values[key] = cls.params[key].check(key, value, owner)
        return values

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
        out = super().__call__(policy, reference, **extras)
        return out if isinstance(out, LossOutput) else LossOutput(*out)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


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
    loss: PreferenceLoss, policy: LogProbs, reference: LogProbs | None, weights: Tensor | None = None
) -> LossOutput:
    """Call ``loss`` the way the harness does: extras only when the variant declares them. The statistics
    (``STATISTICS``) are the policy's alone, and only those the variant declares: training computes nothing else,
    so the contract check and the landscape give nothing else either."""
    extras: dict[str, Tensor] = {}
    if "weights" in loss.inputs and weights is not None:
        extras["weights"] = weights
    policy = policy.without(s for s in STATISTICS if s not in loss.inputs)
    if reference is not None:
        reference = reference.without(STATISTICS)
    return loss(policy, None if loss.reference_free else reference, **extras)


def check_output(out: Any, batch_size: int) -> None:
    """The harness's own contract check on every call: per-pair tensors of shape (B,)."""
    for name, value in zip(("losses", "chosen_rewards", "rejected_rewards"), out, strict=True):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch_size,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the loss returned {name} of shape {shape} for {batch_size} pairs; expected ({batch_size},)"
            )
