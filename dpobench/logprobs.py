"""Completion log-probs of a causal LM, and the reference cache shared by every cell of a sweep.

Chosen and rejected go through one concatenated forward. The LM head is applied only at completion
positions, in chunks, so no (B, T, V) float32 log-softmax is ever held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench._util import atomic_path
from dpobench.data import Pair

__all__ = ["Batch", "collate", "reference_logprobs", "sequence_logprobs"]


@dataclass
class Batch:
    input_ids: Tensor  # (N, T), rows = [chosen_1..B, rejected_1..B] for pairs, right-padded
    attention_mask: Tensor  # (N, T): 1 for real tokens (causal attention needs no mask on right-padded rows)
    target_mask: Tensor  # (N, T−1) bool: position t predicts a completion token at t+1
    tokens: Tensor  # (N,) completion tokens per row
    # the completion positions as indices, made on the CPU by ``collate``, so that selecting them on a GPU needs no
    # count from the device (boolean indexing would stall the host until the forward pass had run)
    positions: Tensor  # (K,) index into the flattened (N·T) positions: row·T + t for each target_mask[row, t]
    targets: Tensor  # (K,) the completion token each of them predicts
    rows: Tensor  # (K,) the row each belongs to

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, multiple: int = 1) -> Batch:
    """(prompt, completion) rows, right-padded into one batch, its width rounded up to a ``multiple`` (which bounds
    the number of distinct shapes, for CUDA graphs)."""
    prompt = torch.tensor([len(p) for p, _ in rows])
    completion = torch.tensor([len(c) for _, c in rows])
    total = prompt + completion
    width = -(-int(total.max()) // multiple) * multiple
    ids = torch.tensor([[*p, *c, *([pad_id] * (width - len(p) - len(c)))] for p, c in rows], dtype=torch.long)
    position = torch.arange(width)
    attention = (position[None, :] < total[:, None]).long()
    # position t predicts token t + 1: completion targets are the positions len(p) − 1 … len(p) + len(c) − 2
    before = position[None, : width - 1]
    target = (before >= prompt[:, None] - 1) & (before < total[:, None] - 1)
    row, column = target.nonzero(as_tuple=True)
    return Batch(ids, attention, target, completion.float(), row * width + column, ids[row, column + 1], row)


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
    def forward(ctx, hidden, weight, targets, chunk: int, dtype, want_logsumsq: bool):  # type: ignore[override]
        w = weight.to(dtype)
        n = hidden.shape[0]
        token_logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lss = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_logsumsq else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = (hidden[start:end].to(dtype) @ w.T).float()
            lse[start:end] = torch.logsumexp(logits, -1)
            token_logp[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            if lss is not None:  # log Σ_v p(v)², WPO's per-token statistic (a constant: no gradient)
                lss[start:end] = torch.logsumexp(2 * logits, -1) - 2 * lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        if lss is None:
            return token_logp, token_logp.new_zeros(0)
        ctx.mark_non_differentiable(lss)
        return token_logp, lss

    @staticmethod
    def backward(ctx, grad_logp, _grad_lss):  # type: ignore[override]
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
            grad = (h @ w.T).float().sub_(lse[start:end, None]).exp_()  # softmax, recomputed
            g = grad_logp[start:end].float()
            grad.mul_(-g[:, None])
            grad.scatter_add_(1, targets[start:end, None], g[:, None])  # (onehot − softmax) · g
            grad = grad.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        return (
            grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None
        )  # fmt: skip


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def sequence_logprobs(
    model: Any, batch: Batch, *, logsumsq: bool = False, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Σ_t log π(y_t | x, y_<t) over completion tokens per row, float32; optionally Σ_t log Σ_v π(v)².

    The LM head is applied only at completion positions, ``chunk_tokens`` at a time (by default as many as fit
    ``LOGITS_BUDGET``), through a fused head whose backward recomputes logits chunk by chunk."""
    head = model.get_output_embeddings()
    if _head_only_path(model) and getattr(head, "bias", None) is None:
        # no attention mask: rows are right-padded, so causal attention keeps every real token from seeing a pad,
        # and without one SDPA runs its causal kernel (flash attention where it has one), builds no (N, T, T) mask
        # and reads nothing back from the device. No KV cache: it would cost memory and give each layer its own
        # compile guard
        hidden = model.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        selected = hidden.flatten(0, 1).index_select(0, batch.positions)
        chunk = chunk_tokens or max(1, LOGITS_BUDGET // head.weight.shape[0])
        token_logp, token_lss = _HeadLogprobs.apply(
            selected, head.weight, batch.targets, chunk, _compute_dtype(selected), logsumsq
        )  # fmt: skip
    else:  # models that transform their logits (or have a head bias): take them whole
        logits = (
            model(input_ids=batch.input_ids, use_cache=False)  # right-padded: no mask needed, as above
            .logits.flatten(0, 1)
            .index_select(0, batch.positions)
            .float()
        )
        token_logp = -F.cross_entropy(logits, batch.targets, reduction="none")
        with torch.no_grad():
            token_lss = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1) if logsumsq else None
    zeros = torch.zeros(batch.size, dtype=torch.float32, device=token_logp.device)
    sums = zeros.index_add(0, batch.rows, token_logp)
    lss = zeros.index_add(0, batch.rows, token_lss) if logsumsq else None
    return sums, lss


@torch.no_grad()
def rows_logprobs(
    model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *, device: str,
    batch_size: int = 128, autocast: bool = False,
) -> Tensor:  # fmt: skip
    """Completion log-probs of (prompt, completion) rows, without gradients, on the CPU, float32."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out.append(sequence_logprobs(model, batch)[0].cpu())
    return torch.cat(out)


def reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, *, device: str, batch_size: int = 64, autocast: bool = False
) -> tuple[Tensor, Tensor]:
    """Reference (chosen, rejected) log-probs of every pair, on the CPU, float32."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):  # one batch holds a chunk's chosen and rejected rows
        part = pairs[start : start + batch_size]
        sums = rows_logprobs(model, pair_rows(part), pad_id, device=device, batch_size=2 * len(part), autocast=autocast)
        chosen.append(sums[: len(part)])
        rejected.append(sums[len(part) :])
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, key: str, cache_dir: Path, *, device: str, autocast: bool
) -> tuple[Tensor, Tensor]:
    """``reference_logprobs``, computed once per (model, data, precision) and kept as safetensors."""
    from safetensors.torch import load_file, save_file

    name = hashlib.sha256(f"{key}|{autocast}|{len(pairs)}".encode()).hexdigest()[:20]
    path = cache_dir / "reference" / f"{name}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            if stored["chosen"].shape == (len(pairs),):
                return stored["chosen"], stored["rejected"]
        except Exception:  # a corrupted entry is rebuilt, not trusted
            pass
    chosen, rejected = reference_logprobs(model, pairs, pad_id, device=device, autocast=autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
    return chosen, rejected
