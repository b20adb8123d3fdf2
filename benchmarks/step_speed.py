"""Training-step speed and memory: dpobench's own loop against a plain PyTorch DPO step, same model, same
data, same batch, measured one after the other in one process.

    python benchmarks/step_speed.py                       # base size on CUDA, 8 and 32 pairs per step
    python benchmarks/step_speed.py --size tiny --device cpu --pairs 8 --steps 4 --prompt 32 --completion 15

The plain step is the field's baseline of issue #5: the reference forward on every step, the full float32
log-softmax over (B, T, V), chosen and rejected concatenated, torch's default AdamW. dpobench's step is
`dpobench.train.train_cell` itself (reference log-probs cached before training, LM head applied only at
completion positions in chunks, fused AdamW on CUDA, bf16 autocast), timed from its own per-step records.
Sequences are random tokens, `--prompt` + `--completion` long (256 + 127: ~766 tokens per pair, as in the
issue's table). MFU counts 6 × parameters FLOPs per trained token (+2 × parameters per token for a reference
forward done inside the step) over the card's bf16 matrix rate measured here (8192³ products).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import plain_dpo_loss

import dpobench
from dpobench.data import Pair, PairSet
from dpobench.models import SIZES
from dpobench.train import TrainConfig, train_cell


def build_model(size: str, vocab: int, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
                         **SIZES[size])  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def make_pairs(n: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: tuple(torch.randint(1, vocab, (k,), generator=g).tolist())  # noqa: E731
    return [Pair(rand(prompt), rand(completion), rand(completion)) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bf16_matmul_tflops(device: str) -> float:
    """The card's bf16 matrix rate measured here (mean of 10 products of 8192³ after 3 warm-ups)."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def full_softmax_logp(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain way: a float32 log-softmax over the whole (B, T, V), then gather the targets."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def plain_run(model, reference, pairs: list[Pair], batch: int, steps: int, device: str) -> list[float]:
    """Seconds per step of the plain loop (first two steps are warm-up and not returned)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    autocast = device.startswith("cuda")
    times = []
    for step in range(steps + 2):
        part = pairs[(step * batch) % len(pairs) :][:batch]
        rows = [p.prompt + p.chosen for p in part] + [p.prompt + p.rejected for p in part]
        ids = torch.tensor(rows, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, len(part[0].prompt) :] = True
        sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                ref_logits = reference(input_ids=ids).logits
            logits = model(input_ids=ids).logits

        pol, ref = full_softmax_logp(logits, ids, mask), full_softmax_logp(ref_logits, ids, mask)
        b = len(part)
        losses, _, _ = plain_dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:])
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        del ref_logits, logits, pol, ref, losses
    return times[2:]


def measure(args: argparse.Namespace, batch: int, peak_tflops: float) -> list[dict[str, object]]:
    device = args.device
    pairs = make_pairs(max(batch * (args.steps + 5), 64), args.prompt, args.completion, args.vocab)
    tokens_per_pair = 2 * (args.prompt + args.completion)
    rows = []

    # dpobench: its own training loop; reference log-probs were cached before training (zeros stand in: the
    # values do not change the cost of a step).
    model = build_model(args.size, args.vocab, "cpu")
    params = sum(p.numel() for p in model.parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = (torch.zeros(len(pairs)), torch.zeros(len(pairs)))
    for compiled in (False, True) if args.compile else (False,):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        warmup = 5 if compiled else 2  # compilation (and any recompiles) happen in the first steps
        result = train_cell(
            model, state, dpobench.get_loss("dpo"), PairSet(pairs), reference, 0,
            TrainConfig(steps=args.steps + warmup, batch_size=batch, lr=1e-6, device=device, compile=compiled),
            seed=0, evaluate=lambda m, s: {"step": s},
        )  # fmt: skip
        step_s = [s["step_time_ms"] / 1e3 for s in result.steps[warmup:]]
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        name = "dpobench --compile" if compiled else "dpobench"
        rows.append(row(name, batch, step_s, tokens_per_pair, params, 6, peak_tflops, memory))
    del model, state
    gc.collect()

    # The plain baseline: policy and reference both on the device.
    model = build_model(args.size, args.vocab, device)
    reference_model = build_model(args.size, args.vocab, device).eval()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step_s = plain_run(model, reference_model, pairs, batch, args.steps, device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    rows.append(row("plain PyTorch", batch, step_s, tokens_per_pair, params, 8, peak_tflops, memory))
    del model, reference_model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def row(name: str, batch: int, step_s: list[float], tokens_per_pair: int, params: int, flops_per_token: int,
        peak_tflops: float, memory_gb: float) -> dict[str, object]:  # fmt: skip
    median = statistics.median(step_s)
    tokens_s = batch * tokens_per_pair / median
    return {"implementation": name, "pairs/step": batch, "pairs/s": batch / median, "tokens/s": tokens_s,
            "step ms (median)": median * 1e3, "MFU": flops_per_token * params * tokens_s / (peak_tflops * 1e12),
            "peak memory GB": memory_gb, "params M": params / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=list(SIZES))
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--pairs", default="8,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=127)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time dpobench with torch.compile")
    args = parser.parse_args()
    peak = bf16_matmul_tflops(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; measured bf16 matmul: {peak:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    rows = []
    for batch in [int(b) for b in args.pairs.split(",")]:
        measured = measure(args, batch, peak)
        for r in measured:  # as they come, in case a later configuration runs out of time
            print(f"measured: {r['implementation']}, {batch} pairs/step: {r['pairs/s']:.1f} pairs/s, "
                  f"{r['peak memory GB']:.2f} GB", flush=True)  # fmt: skip
        rows += measured
    base = {r["pairs/step"]: r["pairs/s"] for r in rows if r["implementation"] == "plain PyTorch"}
    base_mem = {r["pairs/step"]: r["peak memory GB"] for r in rows if r["implementation"] == "plain PyTorch"}
    print("| implementation | pairs/step | pairs/s | × plain | tokens/s | step ms | MFU | peak GB | × plain memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["pairs/step"]
        print(f"| {r['implementation']} | {b} | {r['pairs/s']:.1f} | {r['pairs/s'] / base[b]:.2f} | {r['tokens/s']:.0f} | "
              f"{r['step ms (median)']:.1f} | {r['MFU']:.1%} | {r['peak memory GB']:.2f} | "
              f"{r['peak memory GB'] / base_mem[b]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
