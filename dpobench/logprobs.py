"""Completion log-probs of a causal LM, and the reference cache shared by every cell of a sweep.

Chosen and rejected go through one concatenated forward. The LM head is applied only at completion
positions, in chunks, so no (B, T, V) float32 log-softmax is ever held.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench._util import atomic_path
from dpobench.data import ExampleSet, Pair
from dpobench.losses import LogProbs

__all__ = [
    "Batch", "ExampleReference", "ReferenceLogps", "cached_example_reference", "can_share_prompt", "collate", "collate_shared", "per_token_rows", "reference_logprobs",
    "sequence_logprobs",
]  # fmt: skip


@dataclass
class Batch:
    """Sequences to score, right-padded into rows, with their completion positions.

    Two layouts: one row per sequence (``collate``: rows = [chosen_1..B, rejected_1..B] for pairs), or one row per
    pair with its prompt once (``collate_shared``: prompt, chosen, rejected), where ``position_ids`` restart the
    rejected completion after the prompt and ``causal_mask``, built on the batch's device from ``segments``, keeps it
    from seeing the chosen one."""

    input_ids: Tensor  # (R, T), right-padded
    attention_mask: Tensor  # (R, T): 1 for real tokens (causal attention needs no mask on right-padded rows)
    target_mask: Tensor | None  # (R, T−1) bool: position t predicts a completion token at t+1 (one row per sequence)
    tokens: Tensor  # (N,) completion tokens per sequence
    # the completion positions as indices, made on the CPU, so that selecting them on a GPU needs no count from the
    # device (boolean indexing would stall the host until the forward pass had run)
    positions: Tensor  # (K,) index into the flattened (R·T) positions of each position that predicts a target
    targets: Tensor  # (K,) the completion token each of them predicts
    rows: Tensor  # (K,) the sequence (0 … N−1) each belongs to
    position_ids: Tensor | None = None  # (R, T): shared-prompt rows only
    segments: Tensor | None = None  # (R, T): 0 prompt, 1 chosen, 2 rejected, −1 pad; shared-prompt rows only

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(
            None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=True) for f in fields(self)
        ))  # fmt: skip

    @property
    def size(self) -> int:
        """Sequences scored (rows of the log-prob sums)."""
        return self.tokens.shape[0]

    @property
    def causal_mask(self) -> Tensor | None:
        """(R, 1, T, T) bool, True where a query may attend: causal, and a completion sees the prompt and itself; a pad
        (after every real token) sees anything before it. Built where ``segments`` lie, so that a GPU gets R·T
        segment ids per step rather than R·T² mask entries made by the host."""
        if self.segments is None:
            return None
        q = torch.arange(self.segments.shape[1], device=self.segments.device)
        seen, seer = self.segments[:, None, :], self.segments[:, :, None]
        return ((q[:, None] >= q[None, :]) & ((seen == 0) | (seen == seer) | (seer == -1)))[:, None]


def round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def _pad_rows(rows: Sequence[Sequence[Sequence[int]]], lengths: Tensor, width: int, pad_id: int) -> Tensor:
    """Each row's sequences end to end, right-padded with ``pad_id`` to ``width`` (``lengths``: each row's total),
    as int64. Through numpy: a third of the time of ``torch.tensor`` on nested lists, and this runs every step."""
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(row) for row in rows), np.int64, int(lengths.sum()))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[np.arange(width)[None, :] < lengths.numpy()[:, None]] = flat
    return torch.from_numpy(ids)


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, multiple: int = 1) -> Batch:
    """(prompt, completion) rows, right-padded into one batch, its width rounded up to a ``multiple`` (which bounds
    the number of distinct shapes, for CUDA graphs)."""
    prompt = torch.tensor([len(p) for p, _ in rows])
    completion = torch.tensor([len(c) for _, c in rows])
    total = prompt + completion
    width = round_up(int(total.max()), multiple)
    ids = _pad_rows(rows, total, width, pad_id)
    position = torch.arange(width)
    attention = (position[None, :] < total[:, None]).long()
    # position t predicts token t + 1: completion targets are the positions len(p) − 1 … len(p) + len(c) − 2
    before = position[None, : width - 1]
    target = (before >= prompt[:, None] - 1) & (before < total[:, None] - 1)
    row, column = target.nonzero(as_tuple=True)
    return Batch(ids, attention, target, completion.float(), row * width + column, ids[row, column + 1], row)


def collate_shared(pairs: Sequence[Pair], pad_id: int, multiple: int = 1) -> Batch:
    """Pairs as one row each, prompt + chosen + rejected, so the prompt goes through the model once, not twice.

    The rejected completion's positions restart where the prompt ends and it attends to the prompt and itself only,
    so every completion token sees exactly what it sees in its own row of ``collate``: the log-probs are the same,
    within float rounding. Sequences are numbered as in ``collate(pair_rows(pairs))``: chosen 0 … B−1, rejected
    B … 2B−1. The prompt's last position predicts both completions' first tokens."""
    n = len(pairs)
    p = torch.tensor([len(x.prompt) for x in pairs])[:, None]
    c = torch.tensor([len(x.chosen) for x in pairs])[:, None]
    r = torch.tensor([len(x.rejected) for x in pairs])[:, None]
    total = (p + c + r)[:, 0]
    width = round_up(int(total.max()), multiple)
    ids = _pad_rows([(x.prompt, x.chosen, x.rejected) for x in pairs], total, width, pad_id)
    q = torch.arange(width)[None, :]
    segment = torch.where(q < p, 0, torch.where(q < p + c, 1, torch.where(q < p + c + r, 2, -1)))  # pad: −1
    position_ids = torch.where(segment == 2, q - c, torch.where(segment == -1, 0, q))
    # chosen: positions p−1 … p+c−2 predict the next token; rejected: p−1 predicts its first token, then p+c … p+c+r−2
    chosen_at = (q >= p - 1) & (q <= p + c - 2)
    rejected_next = (q >= p + c) & (q <= p + c + r - 2)
    row_c, col_c = chosen_at.nonzero(as_tuple=True)
    row_r, col_r = (((q == p - 1) & (r > 0)) | rejected_next).nonzero(as_tuple=True)
    first = col_r == (p - 1)[row_r, 0]
    next_r = torch.where(first, col_r + c[row_r, 0] + 1, col_r + 1)  # the token each rejected position predicts
    row, col = torch.cat([row_c, row_r]), torch.cat([col_c, col_r])
    return Batch(
        ids, (segment >= 0).long(), None, torch.cat([c[:, 0], r[:, 0]]).float(), row * width + col,
        torch.cat([ids[row_c, col_c + 1], ids[row_r, next_r]]), torch.cat([row_c, row_r + n]), position_ids, segment,
    )  # fmt: skip


def pair_rows(pairs: Sequence[Pair]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]


def _head_only_path(model: Any) -> bool:
    config = model.config
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier"))


LOGITS_BUDGET = 1 << 25  # elements of one chunk's float32 logits (128 MB): bounds the head's memory


class _HeadLogprobs(torch.autograd.Function):
    """log π(target) per token from final hidden states and the LM head weight, chunk by chunk.

    The backward pass recomputes each chunk's logits instead of keeping them (as Liger-Kernel's fused linear
    cross-entropy does), so no (tokens, V) tensor outlives its chunk in either pass: the head's memory is one
    chunk, whatever the batch. The gradient is exact: ∂ log p_y / ∂ z = onehot(y) − softmax(z), scaled per token
    by the incoming gradient. Matrix products run in ``dtype`` (bf16 under CUDA autocast), softmax in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype, statistics: tuple[str, ...], fused: bool = False):  # type: ignore[override]
        w = weight.to(dtype)
        n = hidden.shape[0]
        token_logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        stats = {name: torch.empty(n, dtype=torch.float32, device=hidden.device) for name in statistics}
        ops = _compiled_head_ops() if fused else _HEAD_OPS  # compiled: one kernel reads the logits in their dtype
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = hidden[start:end].to(dtype) @ w.T
            lse[start:end] = ops.lse(logits)
            for name, values in stats.items():  # the declared statistics: constants of the loss, no gradient
                values[start:end] = ops.statistics[name](logits, lse[start:end])
            token_logp[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1).float() - lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype, ctx.fused = chunk, dtype, fused
        ctx.mark_non_differentiable(*stats.values())
        return token_logp, *stats.values()

    @staticmethod
    def backward(ctx, grad_logp, *_grad_statistics):  # type: ignore[override]
        with torch.autocast(grad_logp.device.type, enabled=False):  # precision is ctx.dtype's, whatever the caller's
            return _HeadLogprobs._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(hidden.shape[0], start + ctx.chunk)
            h = hidden[start:end].to(ctx.dtype)
            g = grad_logp[start:end].float()
            if ctx.fused:  # the same, as one compiled kernel from the logits to the gradient, both in ctx.dtype
                grad = _compiled_head_ops().grad(h @ w.T, lse[start:end], g, targets[start:end])
            else:  # in place: the fewest passes eagerly
                grad = (h @ w.T).float().sub_(lse[start:end, None]).exp_()  # softmax, recomputed
                grad.mul_(-g[:, None])
                grad.scatter_add_(1, targets[start:end, None], g[:, None])  # (onehot − softmax) · g
                grad = grad.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        return (
            grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None, None
        )  # fmt: skip


class _HeadKL(torch.autograd.Function):
    """Σ_v π_ref(v)·(log π_ref(v) − log π(v)) per token, the policy's KL from the reference at each completion
    position, from both models' final hidden states and LM head weights, chunk by chunk as ``_HeadLogprobs``: no
    (tokens, V) tensor outlives its chunk. The gradient reaches the policy's side only: ∂KL/∂z = softmax(z) − π_ref,
    recomputed in the backward pass. Matrix products in ``dtype``, softmaxes in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, chunk: int, dtype):  # type: ignore[override]
        kl = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        w, wr = weight.to(dtype), ref_weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            end = min(hidden.shape[0], start + chunk)
            logp = torch.log_softmax((hidden[start:end].to(dtype) @ w.T).float(), -1)
            ref_logp = torch.log_softmax((ref_hidden[start:end].to(dtype) @ wr.T).float(), -1)
            kl[start:end] = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight)
        ctx.chunk, ctx.dtype = chunk, dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        hidden, weight, ref_hidden, ref_weight = ctx.saved_tensors
        with torch.autocast(grad_kl.device.type, enabled=False):
            w, wr = weight.to(ctx.dtype), ref_weight.to(ctx.dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for start in range(0, hidden.shape[0], ctx.chunk):
                end = min(hidden.shape[0], start + ctx.chunk)
                h = hidden[start:end].to(ctx.dtype)
                p = torch.softmax((h @ w.T).float(), -1)
                p_ref = torch.softmax((ref_hidden[start:end].to(ctx.dtype) @ wr.T).float(), -1)
                grad = ((p - p_ref) * grad_kl[start:end, None].float()).to(ctx.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = grad @ w
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def _head_lse(logits: Tensor) -> Tensor:
    """log Σ_v exp(z_v) per row, in float32, from logits in any dtype."""
    return torch.logsumexp(logits.float(), -1)


def _logsumsq(logits: Tensor, lse: Tensor) -> Tensor:
    """log Σ_v p(v)² per row, in float32, from logits and their log-sum-exp: WPO's weight (arXiv 2406.11827)."""
    return torch.logsumexp(2 * logits.float(), -1) - 2 * lse


#: the per-token statistics of the policy's next-token distribution that a variant can declare in ``inputs``, by
#: name: each a function of a chunk's logits and their log-sum-exp, summed over a sequence's completion tokens into
#: ``LogProbs.chosen_<name>`` / ``rejected_<name>``. Only the statistics a loss declares are computed
TOKEN_STATISTICS: dict[str, Any] = {"logsumsq": _logsumsq}


def _head_grad(logits: Tensor, lse: Tensor, g: Tensor, targets: Tensor) -> Tensor:
    """∂(g · log p_target)/∂z = (onehot(target) − softmax(z)) · g per row, in the logits' dtype: pointwise, so
    that inductor makes it one kernel that reads the logits and writes the gradient, and nothing in between."""
    onehot = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]
    return ((onehot.float() - (logits.float() - lse[:, None]).exp()) * g[:, None]).to(logits.dtype)


class _HeadOps(NamedTuple):
    lse: Any
    statistics: dict[str, Any]
    grad: Any


_HEAD_OPS = _HeadOps(_head_lse, TOKEN_STATISTICS, _head_grad)


@functools.cache
def _compiled_head_ops() -> _HeadOps:
    """``_HEAD_OPS``, torch.compile'd once per process (on first use)."""
    compiled = functools.partial(torch.compile, dynamic=None)
    return _HeadOps(compiled(_head_lse), {k: compiled(f) for k, f in TOKEN_STATISTICS.items()}, compiled(_head_grad))


def _layout(batch: Batch) -> dict[str, Tensor]:
    """The model's arguments for a shared-prompt batch: its positions and mask (none for one row per sequence)."""
    if batch.segments is None:
        return {}
    return {"position_ids": batch.position_ids, "attention_mask": batch.causal_mask}


#: architectures whose shared-prompt rows score as their own rows do, within float rounding: tests/test_logprobs.py
#: builds each from a small config and compares. The mask is what keeps the rejected completion from the chosen one,
#: so a model must attend only through it: hybrids with recurrent, convolutional or linear-attention layers (Jamba,
#: Bamba, Zamba2, LFM2, Qwen3-Next, Falcon-H1, …) read a row left to right whatever the mask says, and an
#: architecture not listed keeps one row per sequence
SHARE_PROMPT_MODEL_TYPES = frozenset({
    "biogpt", "codegen", "cohere", "deepseek_v3", "falcon", "gemma", "glm", "glm4", "gpt2", "gpt_bigcode", "gpt_neox",
    "gptj", "granite", "llama", "mistral", "mixtral", "nemotron", "olmo", "olmo2", "olmoe", "opt", "persimmon", "phi",
    "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "stablelm", "starcoder2",
})  # fmt: skip


def can_share_prompt(model: Any) -> bool:
    """Whether ``model`` scores ``collate_shared`` batches as it scores ``collate`` ones: an architecture of
    ``SHARE_PROMPT_MODEL_TYPES``, taking the 4-D boolean mask as given (transformers' SDPA attention), with no sliding
    window (the mask would override it) and no ALiBi (built from a 2-D mask)."""
    config = model.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = set(getattr(config, "layer_types", None) or ())
    return (
        getattr(config, "model_type", None) in SHARE_PROMPT_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not sliding
        and layers <= {"full_attention"}
        and not getattr(config, "alibi", False)
    )


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def sequence_logprobs(
    model: Any, batch: Batch, *, statistics: Sequence[str] = (), chunk_tokens: int | None = None,
    compiled_head: bool = False, token_width: int | None = None, reference: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Σ_t log π(y_t | x, y_<t) over completion tokens per sequence, float32; and each of ``statistics``
    (``TOKEN_STATISTICS``) summed the same way, by name, and with ``"token_logps"`` among them the per-token log-probs
    themselves, (sequences, ``token_width``) right-padded with 0 (``per_token_rows``), with their gradient; with
    ``"token_kl"``, the policy's KL from ``reference`` (a model) summed over each sequence's completion positions,
    with its gradient, the reference scored here without one.

    The LM head is applied only at completion positions, ``chunk_tokens`` at a time (by default as many as fit
    ``LOGITS_BUDGET``), through a fused head whose backward recomputes logits chunk by chunk. ``compiled_head``:
    its softmax statistics and gradient come from torch.compile'd kernels that read each chunk's logits in their
    own dtype (bf16 under autocast), rather than eager passes over a float32 copy."""
    head = model.get_output_embeddings()
    summed = tuple(name for name in statistics if name not in ("token_logps", "token_kl"))  # computed apart
    if _head_only_path(model) and getattr(head, "bias", None) is None:
        # one row per sequence gets no attention mask: rows are right-padded, so causal attention keeps every real
        # token from seeing a pad, and without one SDPA runs its causal kernel (flash attention where it has one),
        # builds no (N, T, T) mask and reads nothing back from the device; shared-prompt rows get their positions
        # and mask (_layout). No KV cache: it would cost memory and give each layer its own compile guard
        hidden = model.get_decoder()(input_ids=batch.input_ids, use_cache=False, **_layout(batch)).last_hidden_state
        selected = hidden.flatten(0, 1).index_select(0, batch.positions)
        chunk = chunk_tokens or max(1, LOGITS_BUDGET // head.weight.shape[0])
        token_logp, *token_stats = _HeadLogprobs.apply(
            selected, head.weight, batch.targets, chunk, _compute_dtype(selected), summed, compiled_head
        )  # fmt: skip
        if "token_kl" in statistics:
            with torch.no_grad():
                ref_hidden = reference.get_decoder()(input_ids=batch.input_ids, use_cache=False, **_layout(batch))
                ref_selected = ref_hidden.last_hidden_state.flatten(0, 1).index_select(0, batch.positions)
            # its own chunks, always eager: about four float32 (chunk, V) tensors live at once, within the budget
            kl_chunk = max(1, LOGITS_BUDGET // (4 * head.weight.shape[0]))
            token_kl = _HeadKL.apply(selected, head.weight, ref_selected, reference.get_output_embeddings().weight,
                                     kl_chunk, _compute_dtype(selected))  # fmt: skip
    else:  # models that transform their logits (or have a head bias): take them whole
        logits = (
            model(input_ids=batch.input_ids, use_cache=False, **_layout(batch))  # as above
            .logits.flatten(0, 1)
            .index_select(0, batch.positions)
            .float()
        )
        token_logp = -F.cross_entropy(logits, batch.targets, reduction="none")
        with torch.no_grad():
            lse = torch.logsumexp(logits, -1)
            token_stats = [TOKEN_STATISTICS[name](logits, lse) for name in summed]
        if "token_kl" in statistics:
            with torch.no_grad():
                ref_logits = reference(input_ids=batch.input_ids, use_cache=False, **_layout(batch)).logits
                ref_logp = torch.log_softmax(ref_logits.flatten(0, 1).index_select(0, batch.positions).float(), -1)
            token_kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits, -1))).sum(-1)
    zeros = torch.zeros(batch.size, dtype=torch.float32, device=token_logp.device)
    per_sequence = {name: zeros.index_add(0, batch.rows, t) for name, t in zip(summed, token_stats, strict=True)}
    if "token_logps" in statistics:
        per_sequence["token_logps"] = per_token_rows(token_logp, batch, token_width or batch.input_ids.shape[1])
    if "token_kl" in statistics:
        per_sequence["token_kl"] = zeros.index_add(0, batch.rows, token_kl)
    return zeros.index_add(0, batch.rows, token_logp), per_sequence


def per_token_rows(values: Tensor, batch: Batch, width: int) -> Tensor:
    """Per-token ``values`` (one per completion position of ``batch``) as (sequences, ``width``) rows, each sequence's
    values from column 0 in order, 0 after them. Both layouts list a sequence's positions together and in order
    (``collate``'s row-major positions; ``collate_shared``'s chosen then rejected, each row-major), so a value's column
    is its index less where its sequence starts: no count comes back from the device."""
    counts = batch.tokens.long()
    starts = counts.cumsum(0) - counts
    column = torch.arange(values.shape[0], device=values.device) - starts.index_select(0, batch.rows)
    rows = torch.zeros(batch.size, width, dtype=values.dtype, device=values.device)
    return rows.index_put((batch.rows, column), values)


@torch.no_grad()
def rows_logprobs(
    model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *, device: str,
    batch_size: int = 128, autocast: bool = False, statistics: Sequence[str] = (), reference: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Completion log-probs of (prompt, completion) rows, and each of ``statistics``, without gradients, on the
    CPU, float32; per-token log-probs (``"token_logps"``) as wide as the longest completion of all rows."""
    sums, stats = [], []
    width = max((len(c) for _, c in rows), default=0)
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            part, part_stats = sequence_logprobs(model, batch, statistics=statistics, token_width=width,
                                                 reference=reference)  # fmt: skip
        sums.append(part.cpu())
        stats.append({k: v.cpu() for k, v in part_stats.items()})
    return torch.cat(sums), {name: torch.cat([s[name] for s in stats]) for name in statistics}


@dataclass(frozen=True)
class ReferenceLogps:
    """The reference model's log-probs of every pair of a set, computed once for all cells: summed per completion,
    and, where some variant of the sweep declares ``"token_logps"``, per token ((pairs, L) right-padded with 0, L the
    longest completion of the set)."""

    chosen: Tensor
    rejected: Tensor
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None

    def to(self, device: str | torch.device) -> ReferenceLogps:
        return ReferenceLogps(*(None if t is None else t.to(device) for t in self._tensors()))

    def select(self, index: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, width: int) -> LogProbs:
        """The pairs ``index`` as the reference side of a loss call, per-token log-probs (if any) ``width`` wide."""
        per_token = {}
        if self.chosen_token_logps is not None and self.rejected_token_logps is not None:
            per_token = {f"{side}_token_logps": _fit(values.index_select(0, index), width)
                         for side, values in (("chosen", self.chosen_token_logps),
                                              ("rejected", self.rejected_token_logps))}  # fmt: skip
        return LogProbs(self.chosen.index_select(0, index), self.rejected.index_select(0, index), chosen_tokens,
                        rejected_tokens, **per_token)  # fmt: skip

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ExampleReference:
    """The reference model's summed log-probs of every unpaired example of a set, and of its mismatched row (the
    example's prompt with its ``kl_completion``), computed once for all cells."""

    logps: Tensor
    kl_logps: Tensor

    def to(self, device: str | torch.device) -> ExampleReference:
        return ExampleReference(self.logps.to(device), self.kl_logps.to(device))


def cached_example_reference(
    model: Any, examples: ExampleSet, pad_id: int, cache_dir: Path, *, key: str, device: str, autocast: bool
) -> ExampleReference:
    """The reference's log-probs of ``examples`` and their mismatched rows, computed once per (model, examples,
    precision) and kept as safetensors."""
    n = len(examples.examples)

    def compute() -> dict[str, Tensor]:
        rows = [(e.prompt, e.completion) for e in examples.examples]
        rows += [(e.prompt, e.kl_completion) for e in examples.examples]
        sums, _ = rows_logprobs(model, rows, pad_id, device=device, autocast=autocast)
        return {"logps": sums[:n], "kl_logps": sums[n:]}

    stored = _cached_tensors(cache_dir, f"{key}|{examples.fingerprint()}|{autocast}|examples",
                             lambda t: t["logps"].shape == (n,), compute)  # fmt: skip
    return ExampleReference(stored["logps"], stored["kl_logps"])


def _cached_tensors(
    cache_dir: Path, identity: str, usable: Callable[[dict[str, Tensor]], bool],
    compute: Callable[[], dict[str, Tensor]],
) -> dict[str, Tensor]:  # fmt: skip
    """Named tensors kept as one safetensors file in ``cache_dir/reference`` under a hash of ``identity``: read if
    the file is there and ``usable(tensors)``, else ``compute()``d and written (atomically). An entry that cannot be
    read is rebuilt, not trusted."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / "reference" / f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            if usable(stored):
                return stored
        except Exception:  # a corrupted entry
            pass
    tensors = {name: value.contiguous() for name, value in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return tensors


def _fit(rows: Tensor, width: int) -> Tensor:
    """``rows`` cut or zero-padded to ``width`` columns."""
    if rows.shape[1] >= width:
        return rows[:, :width]
    return F.pad(rows, (0, width - rows.shape[1]))


def reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, *, device: str, batch_size: int = 64, autocast: bool = False,
    token_logps: bool = False,
) -> ReferenceLogps:  # fmt: skip
    """Reference log-probs of every pair, on the CPU, float32; per token too with ``token_logps``. No pairs (a file
    of unpaired rows) give empty tensors."""
    if not pairs:
        empty = torch.zeros(0)
        return ReferenceLogps(empty, empty, *((torch.zeros(0, 0),) * 2 if token_logps else ()))
    chosen, rejected, per_token = [], [], []
    statistics = ("token_logps",) if token_logps else ()
    width = max((max(len(p.chosen), len(p.rejected)) for p in pairs), default=0)
    for start in range(0, len(pairs), batch_size):  # one batch holds a chunk's chosen and rejected rows
        part = pairs[start : start + batch_size]
        sums, stats = rows_logprobs(model, pair_rows(part), pad_id, device=device, batch_size=2 * len(part),
                                    autocast=autocast, statistics=statistics)  # fmt: skip
        chosen.append(sums[: len(part)])
        rejected.append(sums[len(part) :])
        if token_logps:
            per_token.append(_fit(stats["token_logps"], width))
    if not token_logps:
        return ReferenceLogps(torch.cat(chosen), torch.cat(rejected))
    n = [len(c) for c in chosen]
    tokens = [t.split([k, k]) for t, k in zip(per_token, n, strict=True)]
    return ReferenceLogps(torch.cat(chosen), torch.cat(rejected), torch.cat([c for c, _ in tokens]),
                          torch.cat([r for _, r in tokens]))  # fmt: skip


def cached_reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, key: str, cache_dir: Path, *, device: str, autocast: bool,
    token_logps: bool = False,
) -> ReferenceLogps:  # fmt: skip
    """``reference_logprobs``, computed once per (model, data, precision, per-token or not) and kept as
    safetensors."""

    def compute() -> dict[str, Tensor]:
        reference = reference_logprobs(model, pairs, pad_id, device=device, autocast=autocast, token_logps=token_logps)
        return {f.name: getattr(reference, f.name) for f in fields(reference) if getattr(reference, f.name) is not None}

    stored = _cached_tensors(
        cache_dir, f"{key}|{autocast}|{len(pairs)}{'|tokens' * token_logps}",
        lambda t: t["chosen"].shape == (len(pairs),) and (not token_logps or "chosen_token_logps" in t), compute,
    )  # fmt: skip
    return ReferenceLogps(**stored)
