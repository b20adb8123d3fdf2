"""The conformance checker for loss authors: ``check_loss`` and ``assert_loss_contract``.

Use it in a plugin's own tests::

    from dpobench.testing import assert_loss_contract
    def test_my_loss():
        assert_loss_contract("my_loss")        # or the class, or a built loss object

Each check says in words what is wrong and what to do; ``dpobench check NAME|FILE`` prints the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from dpobench._util import one_line as _one_line
from dpobench.losses import LogProbs, LossOutput, Param, ParamError, PreferenceLoss, call_loss
from dpobench.registry import LossSpec, docstring_section

__all__ = ["CheckResult", "ContractReport", "assert_loss_contract", "check_loss", "make_batch"]

_ARXIV = re.compile(r"https?://arxiv\.org/abs/\d{4}\.\d{4,5}")


@dataclass(frozen=True)
class CheckResult:
    check: str
    ok: bool
    message: str = ""
    skipped: bool = False


@dataclass
class ContractReport:
    variant: str
    plugin: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def __str__(self) -> str:
        lines = [f"variant {self.variant!r} (plugin {self.plugin!r}): {'passes' if self.ok else 'FAILS'}"]
        lines += [f"  - {r.check}: {r.message}" for r in self.failures]
        return "\n".join(lines)


def make_batch(
    batch_size: int = 8, *, dtype: torch.dtype = torch.float32, seed: int = 0, extreme: bool = False
) -> tuple[LogProbs, LogProbs, dict[str, Tensor]]:
    """A policy and a reference ``LogProbs`` with plausible values (per-token log-probs too, each sum spread evenly
    over its tokens), and the per-pair inputs from the data: ``weights`` in (0.1, 1], ``margin`` in (0, 2].

    ``extreme=True`` mixes log-probs near 0 with −1e4 and 1-token with 4096-token responses, so
    that |margins| reach 1e4 nats: what a diverging run feeds a loss.
    """
    g = torch.Generator().manual_seed(seed)
    if extreme:
        big, tiny = -1e4, -1e-3
        pattern = [
            (tiny, big, big, tiny, 1, 4096),
            (big, tiny, tiny, big, 4096, 1),
            (big, big, tiny, tiny, 1, 1),
            (tiny, tiny, big, big, 1, 4096),
            (-0.0, big, big, -0.0, 512, 1),
            (-500.0, tiny, -500.0, big, 4096, 4096),
        ]
        rows = [pattern[i % len(pattern)] for i in range(batch_size)]
        pc, pr, rc, rr, lc, lr = (torch.tensor(col, dtype=torch.float32) for col in zip(*rows, strict=True))
    else:
        lc = torch.randint(1, 64, (batch_size,), generator=g).float()
        lr = torch.randint(1, 64, (batch_size,), generator=g).float()
        per_token = lambda: 0.3 + 2.0 * torch.rand(batch_size, generator=g)  # noqa: E731
        pc, pr, rc, rr = -lc * per_token(), -lr * per_token(), -lc * per_token(), -lr * per_token()
    # log Σ_v p_v² lies between 2·log p(y_t) and 0 per token: take a point in between.
    lsc, lsr = 0.5 * pc, 0.5 * pr
    inputs = {"weights": 0.1 + 0.9 * torch.rand(batch_size, generator=g),
              "margin": 2.0 * (1 - torch.rand(batch_size, generator=g))}  # fmt: skip
    cast = lambda t: t.to(dtype)  # noqa: E731
    width = 4096 if extreme else 64  # one width for every batch, so that two can be mixed pair by pair
    policy = LogProbs(cast(pc), cast(pr), cast(lc), cast(lr), cast(lsc), cast(lsr)).with_even_tokens(width)
    reference = LogProbs(cast(rc), cast(rr), cast(lc), cast(lr), cast(lsc), cast(lsr)).with_even_tokens(width)
    return policy.with_token_kl(reference), reference, {k: cast(v) for k, v in inputs.items()}


def check_loss(target: str | LossSpec | type[PreferenceLoss] | PreferenceLoss, **params: Any) -> ContractReport:
    """Run every contract check on a variant (a name, spec, class or built loss) and report each."""
    build, name, plugin, cls = _resolve(target, params)
    report = ContractReport(variant=name, plugin=plugin)
    try:
        build()
    except Exception as err:
        report.results.append(CheckResult("builds", False, f"building it with its defaults raised {_one_line(err)}"))
        return report
    for title, check in _CHECKS:
        if title in _NEEDS_CALL and report.results and not report.results[0].ok:
            continue  # the loss cannot be called on an ordinary batch: the first failure says why
        try:
            result = check(build, cls)
        except _BackwardError as err:
            result = CheckResult(title, False, f"the loss's backward pass raised {_one_line(err.__cause__)}")
        except Exception as err:
            result = CheckResult(title, False, f"calling the loss raised {_one_line(err)}")
        report.results.append(result)
    return report


def assert_loss_contract(target: str | LossSpec | type[PreferenceLoss] | PreferenceLoss, **params: Any) -> None:
    """``check_loss``, raising ``AssertionError`` with every failure in words."""
    report = check_loss(target, **params)
    if not report.ok:
        raise AssertionError(str(report))


def _resolve(target: Any, params: dict[str, Any]) -> tuple[Callable[[], PreferenceLoss], str, str, type]:
    if isinstance(target, str):
        from dpobench.plugins import get_losses

        target = get_losses()[target]
    if isinstance(target, LossSpec):
        spec = target
        return (lambda: spec.build(**params)), spec.name, spec.plugin, spec.cls
    if isinstance(target, type) and issubclass(target, PreferenceLoss):
        cls = target
        return (lambda: cls(**params)), cls.name or cls.__name__, cls.__module__, cls
    if isinstance(target, PreferenceLoss):
        loss = target
        return (lambda: loss), loss.name or type(loss).__name__, type(loss).__module__, type(loss)
    raise TypeError(f"cannot check {target!r}: give a variant name, a LossSpec, a PreferenceLoss class or object")


def _run(loss: PreferenceLoss, policy: LogProbs, reference: LogProbs, inputs: dict[str, Tensor]) -> LossOutput:
    # every call from the same state of torch's generator (the caller's left as it was): a loss that draws at random
    # (SamPO's token sampling) is checked as the function of its inputs it is within one training step
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = call_loss(loss, policy, reference, **inputs)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"forward returned {type(out).__name__}; return LossOutput(losses, chosen_rewards, rejected_rewards)"
        )
    return LossOutput(*out)


def _shape_problem(out: LossOutput, batch_size: int) -> str | None:
    for field_name, value in zip(LossOutput._fields, out, strict=True):
        if not isinstance(value, Tensor):
            return f"{field_name} is a {type(value).__name__}, not a torch.Tensor"
        if tuple(value.shape) != (batch_size,):
            hint = " (return per-pair values; the harness takes the mean)" if value.dim() == 0 else ""
            return f"{field_name} has shape {tuple(value.shape)} for a batch of {batch_size} pairs; expected ({batch_size},){hint}"
    return None


def _finite_problem(out: LossOutput, what: str) -> str | None:
    for field_name, value in zip(LossOutput._fields, out, strict=True):
        bad = int((~torch.isfinite(value.detach().float())).sum())
        if bad:
            return f"{field_name} has {bad} non-finite value(s) (NaN or inf) for {what}"
    return None


def _leaves(policy: LogProbs, reference: LogProbs) -> tuple[LogProbs, LogProbs]:
    """The batch with its sums as leaves of the graph; per-token log-probs made anew from them, so that a gradient
    through either reaches the sums."""

    def grad_leaf(t: Tensor) -> Tensor:
        return t.detach().clone().requires_grad_(True)

    def leaf(lp: LogProbs) -> LogProbs:
        out = replace(lp, chosen=grad_leaf(lp.chosen), rejected=grad_leaf(lp.rejected))
        return out if lp.chosen_token_logps is None else out.with_even_tokens(lp.chosen_token_logps.shape[1])

    policy, reference = leaf(policy), leaf(reference)
    return policy.with_token_kl(reference), reference


def _check_shapes(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    out = _run(build(), *make_batch(8))
    problem = _shape_problem(out, 8) or _finite_problem(out, "ordinary inputs") or _dtype_problem(out, torch.float32)
    return CheckResult("shapes and finite values", problem is None, problem or "")


def _dtype_problem(out: LossOutput, dtype: torch.dtype) -> str | None:
    """Every cell trains in the same precision: a loss computes in its inputs' dtype, not in its own."""
    for field_name, value in zip(LossOutput._fields, out, strict=True):
        if value.dtype != dtype:
            return f"{field_name} has dtype {value.dtype} for {dtype} inputs; compute in the inputs' dtype"
    return None


def _check_batch_of_one(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    out = _run(build(), *make_batch(1, seed=1))
    problem = _shape_problem(out, 1) or _finite_problem(out, "a batch of one pair")
    return CheckResult("batch of one", problem is None, problem or "")


class _BackwardError(Exception):
    """The loss's backward pass raised (its ``__cause__``): told apart from the forward call's errors."""


def _backward(loss: torch.Tensor) -> None:
    try:
        loss.backward()
    except Exception as err:
        raise _BackwardError from err


def _check_gradients(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    name = "gradients reach the policy, not the reference"
    policy, reference, inputs = make_batch(8, seed=2)
    policy, reference = _leaves(policy, reference)
    out = _run(build(), policy, reference, inputs)
    if not out.losses.requires_grad:
        return CheckResult(name, False, "losses carry no gradient: do not detach the policy log-probs")
    _backward(out.losses.mean())
    grads = [g for g in (policy.chosen.grad, policy.rejected.grad) if g is not None]
    if not grads or all(float(g.abs().sum()) == 0 for g in grads):
        return CheckResult(name, False, "the policy log-probs get a zero gradient: the loss does not train the policy")
    if any(not torch.isfinite(g).all() for g in grads):
        return CheckResult(name, False, "the policy gradient has NaN or inf for ordinary inputs")
    for g in (reference.chosen.grad, reference.rejected.grad):
        if g is not None and float(g.abs().sum()) != 0:
            return CheckResult(
                name, False, "the reference log-probs receive a gradient: the reference must stay frozen"
            )
    return CheckResult(name, True)


def _check_pair_independent(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    """Pair 0's loss and rewards in two batches that share only pair 0: equal, unless the variant declares
    ``batch_coupled`` (its losses then depend on the rest of the batch, as AOT's sorted margins do)."""
    name = "a pair's loss is its own"
    loss = build()
    if loss.batch_coupled:
        return CheckResult(name, True, "not claimed (batch_coupled = True)", skipped=True)
    (p1, r1, w1), (p2, r2, w2) = make_batch(8, seed=5), make_batch(8, seed=6)
    first = lambda a, b: torch.cat([a[:1], b[1:]]) if a is not None else None  # noqa: E731  pair 0 of a, the rest b
    mixed = [LogProbs(**{f.name: first(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})
             for a, b in ((p1, p2), (r1, r2))]  # fmt: skip
    one, other = _run(build(), p1, r1, w1), _run(build(), *mixed, {k: first(w1[k], w2[k]) for k in w1})
    for field_name, a, b in zip(LossOutput._fields, one, other, strict=True):
        a0, b0 = float(a[0]), float(b[0])
        if not math.isclose(a0, b0, rel_tol=1e-5, abs_tol=1e-6):
            return CheckResult(
                name, False,
                f"pair 0's {field_name} went from {a0:.6g} to {b0:.6g} when only the other pairs of the batch changed; "
                "a variant whose losses depend on the rest of the batch declares `batch_coupled = True`",
            )  # fmt: skip
    return CheckResult(name, True)


def _check_rewards_detached(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    policy, reference, inputs = make_batch(8, seed=3)
    policy, reference = _leaves(policy, reference)
    out = _run(build(), policy, reference, inputs)
    attached = [
        n
        for n, v in (("chosen_rewards", out.chosen_rewards), ("rejected_rewards", out.rejected_rewards))
        if v.requires_grad
    ]
    message = f"{' and '.join(attached)} carry a gradient: return them .detach()ed" if attached else ""
    return CheckResult("rewards detached", not attached, message)


def _check_extreme_inputs(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    name = "finite at extreme inputs"
    for dtype in (torch.float32, torch.bfloat16):
        policy, reference, inputs = make_batch(6, dtype=dtype, extreme=True)
        policy, reference = _leaves(policy, reference)
        out = _run(build(), policy, reference, inputs)
        what = f"{dtype} log-probs between −1e4 and 0 (margins up to 1e4 nats, 1 to 4096 tokens)"
        problem = _finite_problem(out, what)
        if problem:
            return CheckResult(name, False, problem + "; clamp before exp() and use logsigmoid, not log(sigmoid)")
        _backward(out.losses.float().mean())
        for g in (policy.chosen.grad, policy.rejected.grad):
            if g is not None and not torch.isfinite(g.float()).all():
                return CheckResult(name, False, f"the policy gradient is NaN or inf for {what}")
    return CheckResult(name, True)


def _check_bfloat16(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    name = "bfloat16 agrees with float32"
    policy, reference, inputs = make_batch(8, dtype=torch.bfloat16, seed=4)
    low = _run(build(), policy, reference, inputs)
    problem = _shape_problem(low, 8) or _finite_problem(low, "bfloat16 inputs")
    if problem:
        return CheckResult(name, False, problem)
    # The same (bf16-rounded) inputs in float32: only the loss's own arithmetic may differ.
    high = _run(
        build(), policy.to(torch.float32), reference.to(torch.float32), {k: v.float() for k, v in inputs.items()}
    )
    a, b = low.losses.float(), high.losses.float()
    tolerance = 0.05 * b.abs() + 0.05
    if ((a - b).abs() > tolerance).any():
        i = int(((a - b).abs() - tolerance).argmax())
        return CheckResult(
            name,
            False,
            f"pair {i}: loss {a[i].item():.6g} in bfloat16 vs {b[i].item():.6g} in float32 (more than 5% apart)",
        )
    return CheckResult(name, True)


def _check_monotone(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    name = "loss falls as the margin grows"
    loss = build()
    if not loss.monotone:
        return CheckResult(name, True, "not claimed (monotone = False)", skipped=True)
    beta = float(loss.hparams.get("beta", 1.0))
    base, tokens = -20.0, 10.0
    values = []
    margins = torch.linspace(-8.0, 8.0, 33) / beta
    for t in margins.tolist():
        one = lambda v: torch.tensor([v])  # noqa: E731
        policy = LogProbs(one(base + t / 2), one(base - t / 2), one(tokens), one(tokens), one(base), one(base))
        reference = LogProbs(one(base), one(base), one(tokens), one(tokens), one(base), one(base))
        values.append(float(_run(build(), policy.with_even_tokens().with_token_kl(reference), reference.with_even_tokens(),
                                 {"weights": torch.ones(1), "margin": torch.ones(1)}).losses[0]))  # fmt: skip
    for (t0, v0), (t1, v1) in zip(
        zip(margins.tolist(), values, strict=False), zip(margins.tolist()[1:], values[1:], strict=False), strict=False
    ):
        if v1 > v0 + 1e-5 * (1 + abs(v0)):
            return CheckResult(
                name, False,
                f"loss rises from {v0:.6g} to {v1:.6g} as the log-ratio margin goes from {t0:.4g} to {t1:.4g}; "
                "set `monotone = False` if the variant targets a finite margin",
            )  # fmt: skip
    if not values[-1] < values[0]:
        return CheckResult(name, False, f"loss does not fall at all over margins {margins[0]:.4g}..{margins[-1]:.4g}")
    return CheckResult(name, True)


def _check_parameters(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    name = "parameters declared and validated"
    for key, param in cls.params.items():
        if not isinstance(param, Param):
            return CheckResult(
                name, False, f"params[{key!r}] is a {type(param).__name__}; declare it as dpobench.Param"
            )
        if not param.doc:
            return CheckResult(name, False, f"parameter {key!r} has no doc: say what it means in Param(doc=...)")
        bad = _out_of_range(param)
        if bad is None:
            continue
        try:
            build_with = type(build())
            build_with(**{**build().hparams, key: bad})
        except ParamError:
            continue
        return CheckResult(name, False, f"{key}={bad!r} is outside {param.valid} but building the loss accepted it")
    return CheckResult(name, True)


def _out_of_range(param: Param) -> float | None:
    if not isinstance(param.valid, str) or isinstance(param.default, bool):
        return None
    low = param.valid.strip()[1:].split(",")[0].strip()
    if low in ("-inf", ""):
        return None
    value = float(low)
    return value if param.valid.strip().startswith("(") else value - 1.0


def _check_docstring(build: Callable[[], PreferenceLoss], cls: type) -> CheckResult:
    """Every problem of the docstring and ``paper`` at once, so that one fix does not reveal the next."""
    doc = cls.__doc__ or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    problems = []
    if not _ARXIV.search(first):
        problems.append("the docstring's first line must cite the paper as https://arxiv.org/abs/NNNN.NNNNN")
    if not docstring_section(doc, "Formula"):
        problems.append("the docstring needs a 'Formula:' section with the per-pair loss")
    args = docstring_section(doc, "Args")
    missing = [key for key in cls.params if not re.search(rf"^{re.escape(key)}\b", args, re.M)]
    if missing:
        problems.append(f"the docstring's 'Args:' section does not describe {', '.join(missing)}")
    if not getattr(cls, "paper", ""):
        problems.append("set the class attribute `paper` to the paper's URL")
    return CheckResult("docstring convention", not problems, "; ".join(problems))


_CHECKS: list[tuple[str, Callable[[Callable[[], PreferenceLoss], type], CheckResult]]] = [
    ("shapes and finite values", _check_shapes),
    ("batch of one", _check_batch_of_one),
    ("gradients reach the policy, not the reference", _check_gradients),
    ("rewards detached", _check_rewards_detached),
    ("a pair's loss is its own", _check_pair_independent),
    ("finite at extreme inputs", _check_extreme_inputs),
    ("bfloat16 agrees with float32", _check_bfloat16),
    ("loss falls as the margin grows", _check_monotone),
    ("parameters declared and validated", _check_parameters),
    ("docstring convention", _check_docstring),
]
_NEEDS_CALL = {title for title, _ in _CHECKS[1:8]}
