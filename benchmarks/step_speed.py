"""The GPU (and CPU) check of issue #5: one table of pairs/s, tokens/s, MFU and peak memory for dpobench's
training step, the plain PyTorch DPO step and (where ``trl`` is importable) TRL's ``DPOTrainer``, measured one
after the other in one process on the same model, data and batch size.

    python benchmarks/step_speed.py                                   # GPU: base size, 8 and 32 pairs per step
    python benchmarks/step_speed.py --size tiny --device cpu --data task --pairs 32 --steps 40

``--data fixed`` (the default): random-token pairs of ``--prompt`` + ``--completion`` tokens (256 + 127: ~766 tokens
per pair, as in the issue's table), so nothing is padded. ``--data varied``: random tokens of varying length (half
to all of ``--prompt`` and of ``--completion``), so batches differ in width. ``--data task``: the synthetic task's own
pairs (varying lengths). With varying lengths dpobench length-buckets its batches and the plain loop pads random ones.
The steps are those of ``steps.py``.
MFU is issue #5's: 6 × parameters FLOPs per trained token (+2 × parameters per token for a reference forward done
inside the step: the plain loop and TRL) over the card's bf16 matrix rate measured here (8192³ products). Tokens are the
real (unpadded) tokens of the pairs trained on. That count credits every implementation with the LM head at every
position; dpobench (and TRL on CUDA) apply it at completion positions only, so the table also shows "MFU done":
the FLOPs each one performs, 6 × (body + head at completion positions) (+2 × the same for a reference forward;
dpobench's backward recomputation of the head is not counted; where the prompt is shared, the body counts it once
per pair). Fits in about 5 minutes on one H100/H200 at the defaults.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.steps import add_data_arguments, build_model, cuda_graphs_recorded, load_data, make_step, sync
from benchmarks.trl_step import trl_available
from dpobench.acceleration import SpeedOptions
from dpobench.models import SIZES

SHARE_ROWS = ("dpobench", "dpobench --no-compile", "dpobench --cudagraphs")
#: dpobench's rows: what each asks of ``plan_acceleration``, and the plan fields it then sets by hand
ROWS: dict[str, tuple[SpeedOptions, dict[str, object]]] = {
    "dpobench": (SpeedOptions(), {}),  # compiled on CUDA for models of 1 M parameters or more
    "dpobench --no-compile": (SpeedOptions(compile=False), {}),
    "dpobench --no-cudagraphs": (SpeedOptions(cuda_graphs=False), {}),
    "dpobench --compile": (SpeedOptions(compile=True), {}),
    "dpobench --cudagraphs": (SpeedOptions(compile="reduce-overhead"), {}),
    # the host asks whether the loss is finite before the backward pass: a sync mid-step
    "dpobench --compile --synced": (SpeedOptions(compile=True), {"defer_finite_check": False}),
    # each batch as wide as its longest row (CUDA rounds widths up to a multiple of 16)
    "dpobench --exact-widths": (SpeedOptions(), {"pad_multiple": 1}),
}


def row_settings(name: str) -> tuple[SpeedOptions, dict[str, object]]:
    """The ``SpeedOptions`` and plan fields of row ``name`` (the plain loop and TRL take neither)."""
    speed, plan = ROWS.get(name.removesuffix(" --share-prompt"), (SpeedOptions(), {}))
    return (replace(speed, share_prompt=True) if name.endswith(" --share-prompt") else speed), plan


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


def time_steps(step, steps: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()  # every step callable synchronises CUDA before it returns
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, batch: int, data, peak_tflops: float) -> list[dict[str, object]]:
    pairs, vocab, pad = data
    tokens_per_pair = statistics.fmean(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    completions_per_pair = statistics.fmean(len(p.chosen) + len(p.rejected) for p in pairs)
    shared_per_pair = statistics.fmean(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    implementations = ["dpobench", "plain"] + (["trl"] if trl_available() and not args.no_trl else [])
    # "dpobench" is the default (compiled on CUDA for models of 1 M parameters or more); beside it, the other setting
    implementations += ["dpobench --no-compile"] if args.device.startswith("cuda") else []
    implementations += ["dpobench --no-cudagraphs"] if args.device.startswith("cuda") else []
    implementations += ["dpobench --compile"] if args.compile else []
    implementations += ["dpobench --cudagraphs"] if args.cudagraphs else []
    implementations += ["dpobench --compile --synced"] if args.synced else []
    implementations += ["dpobench --exact-widths"] if args.exact_widths else []
    if args.share_prompt:  # the prompt shared (the CPU's default), beside the default and beside CUDA graphs
        implementations += [f"{name} --share-prompt" for name in implementations if name in SHARE_ROWS]
    if args.only:
        implementations = [name for name in implementations if name in args.only.split(",")]
    rows = []
    for name in implementations:
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = build_model(args.size, vocab, "cpu")
        params = sum(p.numel() for p in model.parameters())
        head = model.get_output_embeddings().weight.numel()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        speed, plan = row_settings(name)
        warmup = 5 if name.startswith("dpobench") and speed.compile is not False else 2
        # dpobench plans the steps timed here: by default CUDA graphs run where the plan has few widths per step
        step = make_step(name.split()[0], model, pairs, batch, args.device, pad, speed=speed,
                         steps=warmup + args.steps, **plan)  # fmt: skip
        skips, graphs = counters["inductor"]["cudagraph_skips"], cuda_graphs_recorded()  # inductor can go without
        try:
            warm = time.perf_counter()
            times = time_steps(step, args.steps, warmup, args.device)
            warm = time.perf_counter() - warm - sum(times)  # the warm-up steps: compilation, where there is one
        finally:
            if hasattr(step, "close"):
                step.close()
        memory = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        mean = statistics.fmean(times)  # bucketed batches vary in length: throughput is pairs over the mean step
        tokens_s = batch * tokens_per_pair / mean
        flops_per_token = 6 if name.startswith("dpobench") else 8
        head_share = (
            1.0
            if name == "plain" or (not args.device.startswith("cuda") and name == "trl")
            else (completions_per_pair / tokens_per_pair)
        )  # fraction of positions the head is applied at
        # the body runs a shared prompt once per pair (dpobench's default on the CPU)
        shared = name.startswith("dpobench") and step.trainer.plan.share_prompt
        body_share = shared_per_pair / tokens_per_pair if shared else 1.0
        flops_done = flops_per_token * ((params - head) * body_share + head * head_share)  # per token
        rows.append({"implementation": name, "pairs/step": batch, "pairs/s": batch / mean, "tokens/s": tokens_s,
                     "step ms": mean * 1e3, "MFU": flops_per_token * params * tokens_s / (peak_tflops * 1e12),
                     "MFU done": flops_done * tokens_s / (peak_tflops * 1e12),
                     "peak GB": memory, "params M": params / 1e6})  # fmt: skip
        skips, graphs = counters["inductor"]["cudagraph_skips"] - skips, cuda_graphs_recorded() - graphs
        note = ""
        if name.startswith("dpobench") and args.device.startswith("cuda"):  # whether graphs ran (inductor can skip)
            note = f"; {graphs} CUDA graphs recorded"
            note += " (none: the row ran without them)" if not graphs and step.trainer.plan.cuda_graphs else ""
            note += f", {skips} skipped (TORCH_LOGS=cudagraphs says why)" if skips else ""
        print(f"measured: {name}, {batch} pairs/step: {batch / mean:.1f} pairs/s, {memory:.2f} GB "
              f"(warm-up steps took {warm:.1f} s){note}", flush=True)  # fmt: skip
        del step, model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=list(SIZES))
    add_data_arguments(parser, "fixed")
    parser.add_argument("--pairs", default="8,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time dpobench with torch.compile")
    parser.add_argument("--cudagraphs", action="store_true",
                        help='also time dpobench with torch.compile(mode="reduce-overhead"): CUDA graphs')  # fmt: skip
    parser.add_argument("--synced", action="store_true",
                        help="also time dpobench --compile with the host asked mid-step whether the loss is finite")  # fmt: skip
    parser.add_argument("--share-prompt", action="store_true",
                        help="also time dpobench (and --cudagraphs) with the prompt shared, the CPU's default")  # fmt: skip
    parser.add_argument("--exact-widths", action="store_true",
                        help="also time dpobench with each batch as wide as its longest row (CUDA rounds widths up "
                        "to a multiple of 16); on varying lengths, run it in a process of its own: each new shape "
                        "costs once per process (a cuDNN plan, a compiled shape), so a later row inherits them")  # fmt: skip
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out even where it is importable")
    parser.add_argument("--only", default="", help="comma-separated implementations to time (plain is the baseline)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the table, profile this many dpobench steps (default settings; with --compile: compiled) at the "
        "first --pairs value",
    )
    args = parser.parse_args()
    peak = bf16_matmul_tflops(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; measured bf16 matmul: {peak:.0f} TFLOP/s; torch {torch.__version__}; "
          f"trl {'importable' if trl_available() else 'absent'}", flush=True)  # fmt: skip
    batches = [int(b) for b in args.pairs.split(",")]
    data = load_data(args, max(batches) * (args.steps + 8))
    rows = []
    for batch in batches:
        rows += measure(args, batch, data, peak)
    base = {r["pairs/step"]: r for r in rows if r["implementation"] == "plain"}
    print(f"\n{args.size} size ({rows[0]['params M']:.1f} M parameters), {args.data} data, {name}:")
    print(
        "| implementation | pairs/step | pairs/s | × plain | tokens/s | step ms | MFU | MFU done | peak GB | × plain memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        plain = base.get(r["pairs/step"])  # absent where --only leaves the plain loop out: no ratios then
        speed, memory = (("–", "–") if plain is None else
                         (f"{r['pairs/s'] / plain['pairs/s']:.2f}", f"{r['peak GB'] / plain['peak GB']:.2f}"))  # fmt: skip
        print(f"| {r['implementation']} | {r['pairs/step']} | {r['pairs/s']:.1f} | {speed} | "
              f"{r['tokens/s']:.0f} | {r['step ms']:.1f} | {r['MFU']:.1%} | {r['MFU done']:.1%} | {r['peak GB']:.2f} | "
              f"{memory} |")  # fmt: skip
    if args.profile:
        profile(args, batches[0], data)


def profile(args: argparse.Namespace, batch: int, data) -> None:
    """Where a dpobench step's time goes: torch.profiler over ``args.profile`` steps after 3 warm-ups. Prints the
    busiest operators and how much of the wall time the device was busy (little: the step is launch-bound)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pairs, vocab, pad = data
    step = make_step("dpobench", build_model(args.size, vocab, "cpu"), pairs, batch, args.device, pad,
                     speed=SpeedOptions(compile=True if args.compile else None))  # fmt: skip
    for _ in range(5):
        step()
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(args.device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(args.profile):
            step()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile: {args.profile} dpobench{' --compile' if args.compile else ''} steps of {batch} pairs, {wall / args.profile * 1e3:.1f} ms per step "
          f"under the profiler")  # fmt: skip
    if cuda:
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6  # µs → s: device kernels only
        print(f"device busy {busy / wall:.0%} of the wall time ({busy / args.profile * 1e3:.1f} ms per step)")
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
