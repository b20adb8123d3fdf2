"""The one training loop, and the evaluation it calls. Only the loss differs between cells.

Every cell: the policy starts from the reference weights; the same batches in the same order (per
seed); AdamW with the same learning rate, warm-up, clipping, precision and number of steps.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dpobench._util import one_line as _one_line
from dpobench.data import PairSet, TaskData, decode_completion, sample_completions
from dpobench.logprobs import collate, pair_rows, rows_logprobs, sequence_logprobs
from dpobench.losses import LogProbs, PreferenceLoss, call_loss
from dpobench.task import gold_reward, is_grammatical

__all__ = ["CellResult", "Evaluator", "TrainConfig", "batch_order", "train_cell"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    device: str = "cpu"
    compile: bool = False  # torch.compile the decoder (dynamic shapes); pays off on GPUs, costs compile time

    @property
    def autocast(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> str:
        return "bf16-autocast" if self.autocast else "float32"


@dataclass
class CellResult:
    steps: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    status: str = "done"  # or "diverged"
    error: str = ""
    batches: list[int] = field(default_factory=list)  # a fingerprint of each step's pair indices


def batch_order(n_pairs: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The pair indices of every step: epochs of a seeded permutation. The same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    need = steps * batch_size
    while sum(len(o) for o in order) < need:
        order.append(torch.randperm(n_pairs, generator=generator))
    flat = torch.cat(order)[:need]
    return list(flat.view(steps, batch_size))


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def train_cell(
    policy: Any,
    reference_state: dict[str, torch.Tensor],
    loss: PreferenceLoss,
    train: PairSet,
    reference_logps: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
    config: TrainConfig,
    seed: int,
    evaluate: Callable[[Any, int], dict[str, float]],
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CellResult:
    device = config.device
    policy.load_state_dict(reference_state)  # start from the reference weights
    policy.to(device).train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0, fused=device.startswith("cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    ref_chosen, ref_rejected = reference_logps
    weights_all = torch.tensor([p.weight for p in train.pairs], dtype=torch.float32)
    needs_lss = "logsumsq" in loss.inputs
    decoder = torch.compile(policy.get_decoder(), dynamic=True) if config.compile else None
    result = CellResult()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step, index in enumerate(batch_order(len(train.pairs), config.steps, config.batch_size, seed)):
        start = time.perf_counter()
        indices = index.tolist()
        pairs = [train.pairs[i] for i in indices]
        result.batches.append(hash(tuple(indices)))
        batch = collate(pair_rows(pairs), pad_id).to(device)
        b = len(pairs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.autocast):
            sums, lss = sequence_logprobs(policy, batch, logsumsq=needs_lss, decoder=decoder)
        tokens = batch.tokens
        policy_lp = LogProbs(
            sums[:b], sums[b:], tokens[:b], tokens[b:], *((lss[:b], lss[b:]) if lss is not None else ())
        )
        reference = LogProbs(ref_chosen[index].to(device), ref_rejected[index].to(device), tokens[:b], tokens[b:])
        try:  # a plugin's fault fails this cell, not the sweep
            out = call_loss(loss, policy_lp, reference, weights_all[index].to(device))
            _check_output(out, b)
        except Exception as error:
            result.status, result.error = "failed", f"step {step + 1}: {_one_line(error)}"
            break
        mean_loss = out.losses.mean()
        if not torch.isfinite(mean_loss):  # recorded as diverged, at this step; the sweep goes on
            result.status, result.error = "diverged", f"loss is {mean_loss.item()} at step {step}"
            break
        mean_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        margin = out.chosen_rewards - out.rejected_rewards
        result.steps.append(
            {
                "step": step + 1, "loss": mean_loss.item(), "reward_accuracy": (margin > 0).float().mean().item(),
                "reward_margin": margin.mean().item(), "chosen_reward": out.chosen_rewards.mean().item(),
                "rejected_reward": out.rejected_rewards.mean().item(), "chosen_logp": sums[:b].mean().item(),
                "rejected_logp": sums[b:].mean().item(), "grad_norm": float(grad_norm),
                "step_time_ms": elapsed * 1e3, "pairs_per_s": b / elapsed,
                "tokens_per_s": float(batch.attention_mask.sum()) / elapsed, "peak_memory_mb": peak_memory_mb(device),
            }
        )  # fmt: skip
        if on_step:
            on_step(step + 1)
        if should_stop is not None and should_stop():  # Ctrl-C: this step is finished, the cell is not
            result.status, result.error = "interrupted", f"interrupted after step {step + 1}"
            return result
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            if not _evaluate_into(result, evaluate, policy, step + 1):
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


def _check_output(out: Any, batch_size: int) -> None:
    """The harness's own contract check on every call: per-pair tensors of shape (B,)."""
    for name, value in zip(("losses", "chosen_rewards", "rejected_rewards"), out, strict=True):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch_size,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"the loss returned {name} of shape {shape} for {batch_size} pairs; expected ({batch_size},)"
            )


@dataclass
class Evaluator:
    """Samples from a policy on held-out prompts and scores them; implicit rewards on held-out pairs."""

    reference: Any
    tokenizer: Any
    data: TaskData
    heldout_reference: tuple[torch.Tensor, torch.Tensor]
    device: str = "cpu"
    max_new_tokens: int = 48
    autocast: bool = False

    @torch.no_grad()
    def __call__(self, policy: Any, step: int, loss: PreferenceLoss | None, seed: int) -> dict[str, float]:
        """Metrics of ``policy`` after ``step`` steps; ``loss=None`` skips the implicit rewards (the reference)."""
        policy.eval()
        try:
            return {"step": step, **self._samples(policy, seed), **(self._heldout(policy, loss) if loss else {})}
        finally:
            policy.train()

    def _samples(self, policy: Any, seed: int) -> dict[str, float]:
        prompts = self.data.eval_prompts
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            samples = [s[0] for s in sample_completions(
                policy, self.tokenizer, prompts, samples=1, max_new_tokens=self.max_new_tokens, seed=seed + 1000,
                device=self.device,
            )]  # fmt: skip
        rows = list(zip(prompts, samples, strict=True))
        policy_lp = self._logps(policy, rows)
        reference_lp = self._logps(self.reference, rows)
        lengths = [sum(1 for t in s if t != self.tokenizer.eos_token_id) for s in samples]
        metrics = {
            "kl_to_reference": float((policy_lp - reference_lp).mean()),  # E_{y~π}[log π(y) − log π_ref(y)]
            "response_length": statistics.fmean(lengths),
            "n_samples": float(len(samples)),
        }
        if self.data.has_gold:  # metrics that need a gold reward exist only for the synthetic task
            texts = [decode_completion(self.tokenizer, s) for s in samples]
            gold = [gold_reward(t) for t in texts]
            metrics["gold_reward"] = statistics.fmean(gold)
            metrics["gold_reward_se"] = statistics.stdev(gold) / math.sqrt(len(gold)) if len(gold) > 1 else math.nan
            metrics["grammatical_fraction"] = statistics.fmean(float(is_grammatical(t)) for t in texts)
        return metrics

    def _logps(self, model: Any, rows: list[tuple[Any, Any]]) -> torch.Tensor:
        was_on = next(model.parameters()).device
        model.to(self.device)
        out = rows_logprobs(model, rows, self.tokenizer.pad_token_id, device=self.device, autocast=self.autocast)
        model.to(was_on)
        return out

    def _heldout(self, policy: Any, loss: PreferenceLoss) -> dict[str, float]:
        pairs = self.data.heldout.pairs
        if not pairs:
            return {}
        policy_lp = self._logps(policy, pair_rows(pairs))
        n = len(pairs)
        tokens = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=torch.float32)
        ref_c, ref_r = self.heldout_reference
        out = call_loss(
            loss, LogProbs(policy_lp[:n], policy_lp[n:], tokens[:n], tokens[n:]),
            LogProbs(ref_c, ref_r, tokens[:n], tokens[n:]), torch.tensor([p.weight for p in pairs]),
        ) if "logsumsq" not in loss.inputs else None  # fmt: skip
        if out is None:  # WPO needs per-token statistics: held-out rewards are those of its base, β·Δ
            margin = loss.hparams.get("beta", 1.0) * ((policy_lp[:n] - ref_c) - (policy_lp[n:] - ref_r))
        else:
            margin = out.chosen_rewards - out.rejected_rewards
        return {
            "heldout_reward_accuracy": float((margin > 0).float().mean()),
            "heldout_reward_margin": float(margin.mean()),
        }
