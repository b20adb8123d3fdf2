"""The one training loop, and the evaluation it calls. Only the loss differs between cells.

Every cell: the policy starts from the reference weights; the same batches in the same order (per
seed); AdamW with the same learning rate, warm-up, clipping, precision and number of steps.
"""

from __future__ import annotations

import copy
import itertools
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpobench._util import one_line as _one_line
from dpobench.acceleration import (
    Acceleration,
    CompiledLayers,
    SpeedOptions,
    batch_widths,
    is_compile_error,
    plan_acceleration,
)
from dpobench.config import TrainConfig
from dpobench.data import ExampleSet, Pair, PairSet, TaskData, decode_completion, sample_completions
from dpobench.degeneration import distinct_n, is_repetitive
from dpobench.logprobs import (
    Batch,
    ExampleReference,
    ReferenceLogps,
    collate,
    pair_rows,
    round_up,
    rows_logprobs,
    sequence_logprobs,
)
from dpobench.losses import (
    KL_LOGPS,
    MOVING_REFERENCE,
    TOKEN_KL,
    TOKEN_LOGPS,
    Completions,
    LogProbs,
    PreferenceLoss,
    call_loss,
    call_unpaired_loss,
    check_output,
    check_unpaired_output,
    sequence_inputs,
)
from dpobench.task import gold_reward, is_grammatical

__all__ = [
    "CellResult",
    "CellStopped",
    "CellTrainer",
    "Evaluator",
    "TrainConfig",
    "batch_order",
    "train_cell",
]


@dataclass
class CellResult:
    steps: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    status: str = "done"  # or "failed", "diverged", "interrupted"
    error: str = ""
    batches: list[int] = field(default_factory=list)  # a fingerprint of each step's pair indices


def batch_order(
    n_pairs: int, steps: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None, window: int = 0
) -> list[torch.Tensor]:
    """The pair indices of every step: epochs of a seeded permutation, the same for every variant.

    With ``lengths`` and ``window`` > 1, batches are length-bucketed: each epoch's permutation (less its last
    ``n_pairs % batch_size`` pairs, so no batch spans two epochs) is cut into windows of ``window`` batches; a
    window's pairs are sorted by length (ties keep the seeded order), cut into batches, and those batches are
    shuffled. Each pair is still seen at most once per epoch, near its random place, in a batch of similar
    lengths."""
    generator = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    if lengths is None or window <= 1 or n_pairs < batch_size:
        order: list[torch.Tensor] = []
        while sum(len(o) for o in order) < need:
            order.append(torch.randperm(n_pairs, generator=generator))
        return list(torch.cat(order)[:need].view(steps, batch_size))
    length = torch.as_tensor(lengths)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        epoch = torch.randperm(n_pairs, generator=generator)[: n_pairs - n_pairs % batch_size]
        for start in range(0, len(epoch), window * batch_size):
            part = epoch[start : start + window * batch_size]
            part = part[torch.argsort(length[part], stable=True)].view(-1, batch_size)
            batches.extend(part[torch.randperm(len(part), generator=generator)])
    return batches[:steps]


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def optimizer_for(parameters: list[torch.nn.Parameter], config: TrainConfig) -> tuple[Any, Any]:
    """Every cell's optimizer: AdamW without weight decay at the sweep's learning rate, linear warm-up, then flat.

    Fused on the CPU too: one kernel for all parameters (on 2 cores 3.3-4.1x the per-tensor loop's speed,
    benchmarks/investigations/optimizer_speed.py), and its found_inf lets a non-finite step be skipped on the device."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    return optimizer, schedule


class CellStopped(Exception):
    """A step that ends its cell: the loss raised or broke its contract ("failed"), or is not finite ("diverged")."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


#: the step's metrics that come back in its one readback, in order
STEP_READBACK = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
                 "rejected_logp", "grad_norm")  # fmt: skip


class CellTrainer:
    """The training of one cell, one ``step()`` at a time: the one loop every variant goes through.

    ``train_cell`` drives it; the benchmarks time ``step()`` itself. How the step runs fast (compiled layers, CUDA
    graphs, batch layout, head chunks) is the ``acceleration`` plan's, decided once per sweep; without one, the
    defaults for the policy's device and model."""

    def __init__(
        self, policy: Any, reference_state: dict[str, torch.Tensor], loss: PreferenceLoss, train: PairSet | ExampleSet,
        reference_logps: ReferenceLogps | ExampleReference, pad_id: int, config: TrainConfig, seed: int,
        acceleration: Acceleration | None = None, reference_model: Any = None,
    ) -> None:  # fmt: skip
        self.policy, self.loss, self.pad_id, self.config = policy, loss, pad_id, config
        plan = acceleration or plan_acceleration(SpeedOptions(), str(next(policy.parameters()).device), policy)
        device = plan.device
        policy.load_state_dict(reference_state)  # start from the reference weights
        policy.to(device).train()
        policy.zero_grad(set_to_none=True)  # a cell that ended mid-backward (out of memory) may have left some
        torch.manual_seed(seed)
        # listed once, so the step's gradient clipping walks no modules; the trainable ones only (LoRA: the adapters)
        self.parameters = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer, self.schedule = optimizer_for(self.parameters, config)
        # per-item inputs of the loss live on the device, so a step gathers them there (a blocking copy from the host
        # would wait for the queued forward pass)
        self.reference = reference_logps.to(device)
        # the reference model itself, for a loss that needs it in the step: the sweep's frozen one (``reference_model``,
        # on the device) for the sequential KL; a copy of the reference weights of its own for a reference that moves
        self.reference_state, self.reference_model, self.reference_copy = reference_state, reference_model, None
        if isinstance(train, ExampleSet):  # an unpaired loss: as many completions a step as a paired one's 2·batch
            self.pairs, self.examples, per_step = [], train.examples, 2 * config.batch_size
            self.desirable = torch.tensor([e.desirable for e in train.examples], dtype=torch.bool, device=device)
            lengths = [e.length for e in train.examples]
        else:
            self.pairs, self.examples, per_step = train.pairs, [], config.batch_size
            self.pair_inputs = pair_inputs(train.pairs, device)
            lengths = [p.length for p in train.pairs]
        self.use_loss(loss)
        self.order = batch_order(len(lengths), config.steps, per_step, seed, lengths, config.length_buckets)
        self.plan = plan.for_batches(lambda: len(set(self._widths(plan))), config.steps)
        self.layers = CompiledLayers(policy, self.plan)
        self.done = 0
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _widths(self, plan: Acceleration) -> list[int]:
        """The padded width of each planned batch."""
        if self.examples:
            return [round_up(max(self.examples[i].length for i in index.tolist()), plan.pad_multiple)
                    for index in self.order]  # fmt: skip
        return batch_widths(self.order, self.pairs, plan.share_prompt, plan.pad_multiple)

    def use_loss(self, loss: PreferenceLoss) -> None:
        """Train with ``loss`` from the next step on (its state, if it keeps any, reset): the side-by-side step-cost
        measurement (``dpobench.stepcost``) times every configuration on one trainer, one batch and one set of
        weights."""
        if loss.unpaired != bool(self.examples):
            raise ValueError(f"loss {loss.name!r} trains on {'unpaired examples' if loss.unpaired else 'pairs'}; this "
                             f"trainer holds {'examples' if self.examples else 'pairs'}")  # fmt: skip
        loss.reset()
        self.loss, self.sequence_inputs = loss, sequence_inputs(loss)  # what is computed with the policy's sums
        if MOVING_REFERENCE in loss.inputs or (TOKEN_KL in loss.inputs and self.reference_model is None):
            if self.reference_copy is None or self.reference_copy is self.reference_model:
                self.reference_copy = copy.deepcopy(self.policy).requires_grad_(False).eval()
            self.reference_copy.load_state_dict(self.reference_state)  # the reference weights, which a cell may move
        elif TOKEN_KL in loss.inputs:
            self.reference_copy = self.reference_model  # frozen: the sweep's own, no copy
        else:
            self.reference_copy = None  # a copy made for an earlier loss is freed

    def step(self, index: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on the pairs ``index`` (default: the next batch of the order); its metrics.

        Raises ``CellStopped`` when the loss fails or is not finite; the weights and the optimizer's moments are then
        left as they were (with a fused optimizer the learning-rate schedule has advanced: the cell ends there)."""
        state = {k: v.clone() for k, v in self.loss.state_dict().items()}  # a stateful loss's, before this step
        try:
            return self._step(index)
        except CellStopped:
            raise
        except Exception as error:
            if not self.layers.fall_back(error):  # compiled by default, and the compiler failed: eager from now on
                raise
        # out of the except block, so that the failed attempt's tensors (held by the traceback) are freed first
        self.optimizer.zero_grad(set_to_none=True)  # the failed step never reached the optimizer
        self.loss.load_state_dict(state)  # nor may it count twice in a running statistic
        return self._step(index)

    def step_on(self, pairs: Sequence[Pair], reference: ReferenceLogps) -> dict[str, float]:
        """One step on pairs made for it, with the reference's log-probs of them: online training samples its pairs
        from the policy at every step (``dpobench.methods``), so there is no fixed set to index."""
        device = self.plan.device
        self.pairs, self.reference, self.pair_inputs = list(pairs), reference.to(device), pair_inputs(pairs, device)
        return self.step(torch.arange(len(self.pairs)))

    def _step(self, index: torch.Tensor | None) -> dict[str, float]:
        """One step, queued on the device without a sync: batch indices come from the host, the finiteness check
        goes to the optimizer as ``found_inf``, and the step's metrics come back in one readback at its end."""
        config, device = self.config, self.plan.device
        start = time.perf_counter()
        index = self.order[self.done % len(self.order)] if index is None else index
        on_device = index.to(device, non_blocking=True)
        step = self.done + 1
        forward = self._unpaired_forward if self.examples else self._paired_forward
        losses, readback, pairs_seen, trained = forward(index, on_device, step)
        mean_loss = losses.mean()
        # a loss that is not finite is recorded as diverged, at this step; the sweep goes on. Asking the device now
        # would stall it mid-step, so the fused optimizer is told on the device to skip its update (as under AMP's
        # GradScaler), and the step is stopped once its metrics are read back
        deferred = self.plan.defer_finite_check and bool(self.optimizer.defaults.get("fused"))  # found_inf: fused only
        self.optimizer.found_inf = (~torch.isfinite(mean_loss)).float() if deferred else None
        if not deferred:
            _stop_unless_finite(mean_loss.item(), step)
        try:
            mean_loss.backward()
        except Exception as error:  # the loss's own backward (an in-place edit of a saved tensor, say)
            if isinstance(error, torch.OutOfMemoryError) or is_compile_error(error):
                raise  # the sweep's and the compile fallback's to handle
            self.optimizer.zero_grad(set_to_none=True)
            _stop_unless_finite(mean_loss.item(), step)
            raise CellStopped("failed", f"step {step}: backward: {_one_line(error)}") from error
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if MOVING_REFERENCE in self.loss.inputs:
            self._move_reference(self.loss.reference_mix(step))
        # the step's one readback: it waits for the optimizer's update, queued before it
        metrics = torch.stack([mean_loss.detach(), *readback, grad_norm]).float().tolist()
        elapsed = time.perf_counter() - start
        if deferred:  # the weights were left as they were
            _stop_unless_finite(metrics[0], step)
        self.done = step
        return {
            "step": step, **dict(zip(STEP_READBACK, metrics, strict=True)), "step_time_ms": elapsed * 1e3,
            "pairs_per_s": pairs_seen / elapsed, "tokens_per_s": trained / elapsed,
            "peak_memory_mb": peak_memory_mb(device),
        }  # fmt: skip

    def _policy_logprobs(self, batch: Batch, statistics: tuple[str, ...] = (), token_width: int | None = None):
        """The policy's summed log-probs of ``batch`` (and the statistics asked), in the plan's precision and layers."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.plan.autocast), self.layers.active():
            return sequence_logprobs(self.policy, batch, statistics=statistics, token_width=token_width,
                                     chunk_tokens=self.layers.head_chunk_tokens, compiled_head=self.layers.head,
                                     reference=self.reference_copy)  # fmt: skip

    @torch.no_grad()
    def _scored_without_gradient(self, model: Any, batch: Batch, statistics: Sequence[str] = (),
                                 token_width: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """``model``'s summed log-probs of ``batch`` in the plan's precision, eagerly and without gradient."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.plan.autocast):
            return sequence_logprobs(model, batch, statistics=statistics, token_width=token_width)

    @torch.no_grad()
    def _move_reference(self, mix: float) -> None:
        """π_ref ← (1 − mix)·π_ref + mix·π_θ, parameter by parameter (TRL's ``SyncRefModelCallback``)."""
        if mix > 0:
            for moving, trained in zip(self.reference_copy.parameters(), self.policy.parameters(), strict=True):
                moving.mul_(1 - mix).add_(trained, alpha=mix)

    def _paired_forward(self, index: torch.Tensor, on_device: torch.Tensor, step: int):
        """A batch of pairs through the policy and the loss: per-pair losses, the readback's reward and log-prob
        metrics (``STEP_READBACK`` between the loss and the gradient norm), pairs and unpadded tokens trained."""
        pairs = [self.pairs[i] for i in index.tolist()]
        batch = self.plan.collate(pairs, self.pad_id).to(self.plan.device)
        b = len(pairs)
        width = max(max(len(p.chosen), len(p.rejected)) for p in pairs)  # of per-token inputs, if the loss reads them
        sums, statistics = self._policy_logprobs(batch, self.sequence_inputs, width)
        tokens = batch.tokens
        policy_lp = LogProbs.from_rows(sums, tokens, statistics)
        if MOVING_REFERENCE in self.loss.inputs:  # scored now by the moving reference, not read from the cache
            per_token = [s for s in self.sequence_inputs if s == TOKEN_LOGPS]  # the reference has no statistics
            ref_sums, ref_statistics = self._scored_without_gradient(self.reference_copy, batch, per_token, width)
            reference = LogProbs.from_rows(ref_sums, tokens, ref_statistics)
        else:
            reference = self.reference.select(on_device, tokens[:b], tokens[b:], width)
        try:  # a plugin's fault fails this cell, not the sweep
            out = call_loss(self.loss, policy_lp, reference,
                            **{k: v.index_select(0, on_device) for k, v in self.pair_inputs.items()})  # fmt: skip
            check_output(out, b)
        except Exception as error:
            raise CellStopped("failed", f"step {step}: {_one_line(error)}") from error
        margin = (out.chosen_rewards - out.rejected_rewards).detach()
        readback = [(margin > 0).float().mean(), margin.mean(), out.chosen_rewards.detach().mean(),
                    out.rejected_rewards.detach().mean(), sums[:b].detach().mean(), sums[b:].detach().mean()]  # fmt: skip
        trained = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)  # tokens, unpadded
        return out.losses, readback, b, trained

    def _unpaired_forward(self, index: torch.Tensor, on_device: torch.Tensor, step: int):
        """A batch of unpaired examples through the policy (and their mismatched rows, without gradient, where the
        loss reads them) and the loss: as ``_paired_forward``, the chosen side's metrics the desirable examples', the
        rejected side's the undesirable ones', no reward accuracy (no pairs), and half the examples as pairs seen."""
        examples = [self.examples[i] for i in index.tolist()]
        device = self.plan.device
        batch = collate([(e.prompt, e.completion) for e in examples], self.pad_id, self.plan.pad_multiple).to(device)
        sums, _ = self._policy_logprobs(batch)
        desirable = self.desirable.index_select(0, on_device)
        kl = reference_kl = None
        if KL_LOGPS in self.loss.inputs:  # no gradient (as in TRL), and eager: a compiled or graphed pass between
            # the forward and its backward would start a new CUDA-graph step and free the forward's activations
            mismatched = collate([(e.prompt, e.kl_completion) for e in examples], self.pad_id, self.plan.pad_multiple)
            kl, _ = self._scored_without_gradient(self.policy, mismatched.to(device))
            reference_kl = self.reference.kl_logps.index_select(0, on_device)
        policy = Completions(sums, batch.tokens, desirable, kl)
        reference = Completions(self.reference.logps.index_select(0, on_device), batch.tokens, desirable, reference_kl)
        try:  # a plugin's fault fails this cell, not the sweep
            out = call_unpaired_loss(self.loss, policy, reference)
            check_unpaired_output(out, len(examples))
        except Exception as error:
            raise CellStopped("failed", f"step {step}: {_one_line(error)}") from error
        good, bad = desirable.float(), (~desirable).float()
        mean_of = lambda values, mask: torch.where(  # noqa: E731  a side's mean; NaN where the batch has none
            mask.sum() > 0, (values.detach() * mask).sum() / mask.sum().clamp(min=1), torch.nan
        )
        chosen, rejected = mean_of(out.rewards, good), mean_of(out.rewards, bad)
        readback = [torch.tensor(math.nan, device=device), chosen - rejected, chosen, rejected, mean_of(sums, good),
                    mean_of(sums, bad)]  # fmt: skip
        trained = sum(len(e.prompt) + len(e.completion) for e in examples)
        return out.losses, readback, len(examples) / 2, trained


def pair_inputs(pairs: Sequence[Pair], device: str) -> dict[str, torch.Tensor]:
    """The per-pair inputs from the data (``dpobench.losses.PAIR_INPUTS``) of every pair, on ``device``: a step
    gathers its batch's there (a blocking copy from the host would wait for the queued forward pass)."""
    return {
        "weights": torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device),
    }


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n (Stiennon et al. 2020, Appendix G.3): exact where the n samples'
    scores have no ties, an upper bound otherwise (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def _stop_unless_finite(mean_loss: float, step: int) -> None:
    if not math.isfinite(mean_loss):  # recorded as diverged, at this step; the sweep goes on
        raise CellStopped("diverged", f"step {step}: the loss is {mean_loss}")  # as a failed step says "step N: …"


def train_cell(
    policy: Any,
    reference_state: dict[str, torch.Tensor],
    loss: PreferenceLoss,
    train: PairSet | ExampleSet,
    reference_logps: ReferenceLogps | ExampleReference,
    pad_id: int,
    config: TrainConfig,
    seed: int,
    evaluate: Callable[[Any, int], dict[str, float]],
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    acceleration: Acceleration | None = None,
    reference_model: Any = None,
) -> CellResult:
    trainer = CellTrainer(policy, reference_state, loss, train, reference_logps, pad_id, config, seed, acceleration,
                          reference_model)  # fmt: skip
    result = CellResult()

    def step(number: int) -> dict[str, float]:
        index = trainer.order[number]
        result.batches.append(hash(tuple(index.tolist())))
        return trainer.step(index)

    return run_steps(result, step, policy, config, evaluate, on_step, should_stop)


def run_steps(
    result: CellResult, step: Callable[[int], dict[str, float]], policy: Any, config: TrainConfig,
    evaluate: Callable[[Any, int], dict[str, float]], on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CellResult:  # fmt: skip
    """Every cell's loop, whatever its step: ``config.steps`` calls of ``step(number)`` (from 0), each step's metrics
    kept, an evaluation every ``eval_every`` steps and at the end; a ``CellStopped`` step ends the cell with its
    status, a stop request (Ctrl-C) after the step in progress."""
    for number in range(config.steps):
        try:
            result.steps.append(step(number))
        except CellStopped as stop:
            result.status, result.error = stop.status, stop.error
            break
        done = number + 1
        if on_step:
            on_step(done)
        if should_stop is not None and should_stop():  # Ctrl-C: this step is finished, the cell is not
            result.status, result.error = "interrupted", f"interrupted after step {done}"
            return result
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            if not _evaluate_into(result, evaluate, policy, done):
                break
    if result.status == "done":
        _evaluate_into(result, evaluate, policy, config.steps)
    return result


def _evaluate_into(
    result: CellResult, evaluate: Callable[[Any, int], dict[str, float]], policy: Any, step: int
) -> bool:
    try:
        result.evaluations.append(evaluate(policy, step))
        return True
    except Exception as error:  # the held-out rewards call the plugin's loss too
        result.status, result.error = "failed", f"evaluation at step {step}: {_one_line(error)}"
        return False


@dataclass
class Evaluator:
    """Samples from a policy on held-out prompts and scores them; implicit rewards on held-out pairs."""

    reference: Any
    tokenizer: Any
    data: TaskData
    heldout_reference: ReferenceLogps
    device: str = "cpu"
    max_new_tokens: int = 48
    autocast: bool = False
    #: scores the samples as their gold reward where the pairs have none (``--judge``; ``dpobench.judges``)
    judge: Any = None

    @torch.no_grad()
    def __call__(
        self, policy: Any, step: int, loss: PreferenceLoss | None, seed: int, proxy: Any = None
    ) -> dict[str, float]:
        """Metrics of ``policy`` after ``step`` steps; ``loss=None`` skips the implicit rewards (the reference);
        ``proxy`` (a learned reward model) adds its scores of the samples."""
        started = time.perf_counter()
        policy.eval()
        try:
            prompts = self.data.eval_prompts
            samples = [s[0] for s in self._sample(policy, prompts, 1, seed)]
            rows = list(zip(prompts, samples, strict=True))
            policy_lp, _ = self._logps(policy, rows)
            reference_lp, _ = self._logps(self.reference, rows)
            kl = float((policy_lp - reference_lp).mean())  # E_{y~π}[log π(y) − log π_ref(y)]
            return {"step": step, **self.measure(samples, kl, proxy), **(self._heldout(policy, loss) if loss else {}),
                    "eval_seconds": time.perf_counter() - started}  # fmt: skip
        finally:
            policy.train()

    @torch.no_grad()
    def best_of_n(self, n: int, seed: int, proxy: Any) -> dict[str, float]:
        """Best-of-``n``: ``n`` samples of the reference per evaluation prompt, the one ``proxy`` scores highest kept.
        Its KL is the analytic ``best_of_n_kl(n)`` (the policy has no density to score samples with)."""
        started = time.perf_counter()
        prompts = self.data.eval_prompts
        drawn = self._sample(self.reference, prompts, n, seed)
        values = proxy.score([(p, s) for p, group in zip(prompts, drawn, strict=True) for s in group]).view(-1, n)
        picked = [group[i] for group, i in zip(drawn, values.argmax(-1).tolist(), strict=True)]
        return {"step": 0, **self.measure(picked, best_of_n_kl(n), proxy), "n_samples": float(n * len(prompts)),
                "eval_seconds": time.perf_counter() - started}  # fmt: skip

    def _sample(self, model: Any, prompts: list[tuple[int, ...]], n: int, seed: int) -> list[list[tuple[int, ...]]]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return sample_completions(model, self.tokenizer, prompts, samples=n, max_new_tokens=self.max_new_tokens,
                                      seed=seed + 1000, device=self.device)  # fmt: skip

    def measure(self, samples: list[tuple[int, ...]], kl: float, proxy: Any = None) -> dict[str, float]:
        """The metrics of one sample per evaluation prompt (``samples``, in the prompts' order) whose KL from the
        reference is ``kl``: the gold reward (the task's or the judge's), health, length, and ``proxy``'s scores."""
        prompts = self.data.eval_prompts
        lengths = [sum(1 for t in s if t != self.tokenizer.eos_token_id) for s in samples]
        texts = [decode_completion(self.tokenizer, s) for s in samples]
        metrics = {
            "kl_to_reference": kl,
            "response_length": statistics.fmean(lengths),
            "n_samples": float(len(samples)),
            "repetitive_fraction": statistics.fmean(float(is_repetitive(t)) for t in texts),
            "distinct_2": distinct_n(texts, 2),
        }
        if proxy is not None:
            metrics["proxy_reward"] = float(proxy.score(list(zip(prompts, samples, strict=True))).mean())
        if self.data.has_gold or self.judge is not None:
            gold = self.gold(prompts, samples)
            metrics["gold_reward"] = statistics.fmean(gold)
            metrics["gold_samples"] = gold  # per evaluation prompt, in order: the report pairs cells by prompt
            metrics["gold_reward_se"] = statistics.stdev(gold) / math.sqrt(len(gold)) if len(gold) > 1 else math.nan
            if self.data.has_gold:  # the grammar is the synthetic task's
                metrics["grammatical_fraction"] = statistics.fmean(float(is_grammatical(t)) for t in texts)
        return metrics

    def gold(self, prompts: Sequence[Sequence[int]], samples: Sequence[Sequence[int]]) -> list[float]:
        """The gold reward of each (prompt, sample): the synthetic task's, or the judge's."""
        texts = [decode_completion(self.tokenizer, s) for s in samples]
        if self.data.has_gold:
            return [gold_reward(t) for t in texts]
        return self.judge([self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts], texts)

    def _logps(
        self, model: Any, rows: list[tuple[Any, Any]], statistics: tuple[str, ...] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        was_on = next(model.parameters()).device
        model.to(self.device)
        out = rows_logprobs(model, rows, self.tokenizer.pad_token_id, device=self.device, autocast=self.autocast,
                            statistics=statistics, reference=self.reference)  # fmt: skip
        model.to(was_on)
        return out

    def _heldout(self, policy: Any, loss: PreferenceLoss) -> dict[str, float]:
        pairs = self.data.heldout.pairs
        if not pairs:
            return {}
        policy_lp, statistics = self._logps(policy, pair_rows(pairs), sequence_inputs(loss))
        n = len(pairs)
        tokens = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=torch.float32)
        width = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
        reference = self.heldout_reference.select(torch.arange(n), tokens[:n], tokens[n:], width)
        was_training = loss.training
        held = next((t.device for t in itertools.chain(loss.buffers(), loss.parameters())), None)
        loss.eval().cpu()  # a stateful loss does not learn from held-out pairs; its state meets them on the CPU
        try:
            out = call_loss(loss, LogProbs.from_rows(policy_lp, tokens, statistics), reference,
                            **pair_inputs(pairs, "cpu"))  # fmt: skip
        finally:
            loss.train(was_training)
            if held is not None:
                loss.to(held)
        margin = out.chosen_rewards - out.rejected_rewards
        return {
            "heldout_reward_accuracy": float((margin > 0).float().mean()),
            "heldout_reward_margin": float(margin.mean()),
        }
