"""K cells in one training step with stacked weights, against K steps one cell at a time, on the CPU (issue 21's
premise: a small cell's step is bound by per-op overhead, so one forward and backward for K cells should cost about
one cell's).

Both ways run the decoder's forward and backward for K copies of a Llama of a dpobench size (each copy's weights
moved apart a little) on one shared batch of random tokens, and check that the stacked outputs equal the copies':

- ``one at a time``: each copy's own ``LlamaModel`` (transformers, SDPA attention), forward and backward;
- ``vmap``: ``torch.func.stack_module_state`` + ``vmap`` over ``functional_call`` of one copy;
- ``batched by hand``: the same decoder written on stacked weights (a leading cell dimension; ``bmm`` for every
  projection, one SDPA call over K × rows).

    python benchmarks/investigations/stacked_cells.py --size tiny --cells 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import build_model


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight[:, None, None, :] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (K, N, T, in) through each cell's weight (K, out, in)."""
    k, n, t, width = x.shape
    return torch.bmm(x.reshape(k, n * t, width), weight.transpose(1, 2)).view(k, n, t, -1)


def batched_decoder(weights: dict[str, torch.Tensor], ids: torch.Tensor, config, rotary) -> torch.Tensor:
    """LlamaModel's forward (causal, no padding) for K stacked copies at once: (K, N, T, hidden)."""
    k, (n, t) = weights["embed_tokens.weight"].shape[0], ids.shape
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    h = weights["embed_tokens.weight"][:, ids]
    cos, sin = rotary(h[0], torch.arange(t)[None])
    cos, sin = cos[:, None], sin[:, None]
    for layer in range(config.num_hidden_layers):
        w = lambda name, layer=layer: weights[f"layers.{layer}.{name}"]  # noqa: E731
        x = rms(h, w("input_layernorm.weight"), config.rms_norm_eps)
        q, key, v = (linear(x, w(f"self_attn.{p}_proj.weight")).view(k * n, t, heads, head_dim).transpose(1, 2)
                     for p in "qkv")  # fmt: skip
        q, key = q * cos + rotate_half(q) * sin, key * cos + rotate_half(key) * sin
        attention = F.scaled_dot_product_attention(q, key, v, is_causal=True)
        h = h + linear(attention.transpose(1, 2).reshape(k, n, t, -1), w("self_attn.o_proj.weight"))
        x = rms(h, w("post_attention_layernorm.weight"), config.rms_norm_eps)
        gate, up = linear(x, w("mlp.gate_proj.weight")), linear(x, w("mlp.up_proj.weight"))
        h = h + linear(F.silu(gate) * up, w("mlp.down_proj.weight"))
    return rms(h, weights["norm.weight"], config.rms_norm_eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="sequences in the shared batch (32 pairs: 64)")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap's SDPA fallback says it loops
    model = build_model(args.size, vocab=512)
    decoders = [copy.deepcopy(model.get_decoder()) for _ in range(args.cells)]
    with torch.no_grad():
        for number, decoder in enumerate(decoders):
            for parameter in decoder.parameters():
                parameter.add_(0.01 * number)
    config, rotary = model.config, decoders[0].rotary_emb
    ids = torch.randint(0, 512, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    params, buffers = stack_module_state(decoders)
    stacked = {name: tensor.detach().clone().requires_grad_() for name, tensor in params.items()}
    skeleton = copy.deepcopy(decoders[0]).to("meta")

    def one(weights, buffers, ids):
        return functional_call(skeleton, (weights, buffers), (), {"input_ids": ids, "use_cache": False})[0]

    ways = {
        "one at a time": lambda: [
            d(input_ids=ids, use_cache=False).last_hidden_state.pow(2).mean().backward() for d in decoders
        ],
        "vmap": lambda: vmap(one, in_dims=(0, 0, None))(params, buffers, ids).pow(2).mean().backward(),
        "batched by hand": lambda: batched_decoder(stacked, ids, config, rotary).pow(2).mean().backward(),
    }
    with torch.no_grad():
        expected = torch.stack([d(input_ids=ids, use_cache=False).last_hidden_state for d in decoders])
        for name, out in (("vmap", vmap(one, in_dims=(0, 0, None))(params, buffers, ids)),
                          ("batched by hand", batched_decoder(stacked, ids, config, rotary))):  # fmt: skip
            print(f"{name}: largest difference from the copies' own outputs {(out - expected).abs().max():.2e}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            way()  # warm
            start = time.perf_counter()
            for _ in range(args.repeats):
                way()
            times[name].append((time.perf_counter() - start) / args.repeats * 1e3)
    baseline = statistics.median(times["one at a time"])
    print(f"\n{args.size}, {args.cells} cells, a batch of {args.rows} × {args.tokens} tokens, forward + backward of "
          f"the decoder, {torch.get_num_threads()} threads; ms for all {args.cells} cells, median of {args.rounds} "
          "rounds")  # fmt: skip
    print("| way | ms (min–max) | speed-up over one at a time |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} ({min(values):.0f}–{max(values):.0f}) | {baseline / median:.2f} |")


if __name__ == "__main__":
    main()
