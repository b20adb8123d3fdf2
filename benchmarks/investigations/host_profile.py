"""Where the time goes in dpobench's training step: wall time per step, then cProfile over a few steps (sorted by
own time), for one compile setting at a time. A step that waits on the device shows it as the time of the step's
one readback (``tolist``); everything else in the listing is host work that the device may wait on. ``--kernels``:
the device's side instead, torch.profiler's CUDA kernels over the same steps, summed by kind (matrix products,
attention, inductor's fused kernels, the optimizer, …) in ms per step, then the costliest kernels.

    python benchmarks/investigations/host_profile.py --size base --pairs 8 --compile default no-cudagraphs     # on a GPU
    python benchmarks/investigations/host_profile.py --size base --pairs 32 --kernels --sdpa flash             # on a GPU
    python benchmarks/investigations/host_profile.py --size tiny --pairs 4 --device cpu --compile off           # a smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.investigations.step_ab import with_attention_mask
from benchmarks.steps import (
    DpobenchStep,
    add_data_arguments,
    add_kernel_arguments,
    apply_kernel_arguments,
    build_model,
    cuda_graphs_recorded,
    load_data,
    sync,
)
from dpobench.acceleration import SpeedOptions
from dpobench.models import SIZES

#: --compile settings as SpeedOptions' compile and cuda_graphs (None: the default's rule; on CUDA graphs run where the
#: plan has few widths per step, as fixed-length data does)
SETTINGS = {"default": (None, None), "on": (True, None), "off": (False, None), "no-cudagraphs": (True, False),
            "reduce-overhead": ("reduce-overhead", None)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=list(SIZES))
    add_data_arguments(parser, "fixed")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--compile", nargs="+", default=["default"], choices=list(SETTINGS))
    parser.add_argument("--share-prompt", action="store_true", help="each pair as one row (default: the device's)")
    parser.add_argument("--rows", type=int, default=30, help="lines of the profile to print")
    parser.add_argument("--kernels", action="store_true",
                        help="profile the device's kernels (torch.profiler) rather than the host (cProfile)")  # fmt: skip
    parser.add_argument("--attention-mask", action="store_true",
                        help="give the decoder the batch's attention mask (step_ab.py's row)")  # fmt: skip
    add_kernel_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    apply_kernel_arguments(parser, args)
    if args.device.startswith("cuda"):  # why inductor skips CUDA graphs, if it does (it falls back silently)
        torch._logging.set_logs(cudagraphs=True)
    pairs, vocab, pad = load_data(args, args.pairs * (args.steps + args.profile_steps + 8))
    for setting in args.compile:
        compile, graphs = SETTINGS[setting]
        speed = SpeedOptions(compile=compile, cuda_graphs=graphs, share_prompt=True if args.share_prompt else None)
        model = build_model(args.size, vocab, "cpu")
        if args.attention_mask:
            with_attention_mask(model, pad)
        step = DpobenchStep(model, pairs, args.pairs, args.device, pad, speed=speed)
        for _ in range(5):
            step()
        times = []
        for _ in range(args.steps):
            sync(args.device)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        head = (f"\n== {args.size}, {args.pairs} pairs, compile={setting}, share_prompt={step.trainer.plan.share_prompt}, "
                f"SDPA kernels {args.sdpa}, attention mask={args.attention_mask}, inductor {args.inductor or 'defaults'}, "
                f"CUDA graphs recorded {cuda_graphs_recorded()} and skipped {counters['inductor']['cudagraph_skips']} "
                f"times so far: median step {statistics.median(times) * 1e3:.1f} ms")  # fmt: skip
        if args.kernels:
            kernel_profile(step, args, head, statistics.median(times))
            continue
        profiler = cProfile.Profile()
        sync(args.device)
        start = time.perf_counter()
        profiler.enable()
        for _ in range(args.profile_steps):
            step()
        profiler.disable()
        wall = (time.perf_counter() - start) / args.profile_steps
        print(f"{head}, under cProfile {wall * 1e3:.1f} ms", flush=True)
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.rows)
            body = text.getvalue()
            print(f"-- by {key}, per {args.profile_steps} steps\n" + body[body.find("   ncalls") :], flush=True)


#: kinds of CUDA kernel, by substrings of the kernel's name (lower case), the first kind that matches wins: attention
#: before matrix products (cutlass's attention kernels are named fmha_cutlass…), inductor's matmul templates
#: (triton_tem_…) before its fused kernels
KERNEL_KINDS = (
    ("attention (SDPA)", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "triton_tem", "splitk", "sm90_", "sm80_")),
    ("inductor's fused kernels", ("triton",)),
    ("optimizer", ("multi_tensor", "adam")),
    ("embedding backward and sorts", ("embedding", "segment", "sort")),
    ("copies and fills", ("copy", "fill", "memset", "memcpy", "cat_")),
    ("reductions (eager)", ("reduce",)),
    ("elementwise (eager)", ("elementwise",)),
)


def kernel_kind(name: str) -> str:
    """What a CUDA kernel named ``name`` computes, as one of ``KERNEL_KINDS`` (else "other")."""
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lower for key in keys)), "other")


def kernel_profile(step, args: argparse.Namespace, head: str, median: float) -> None:
    """torch.profiler over ``args.profile_steps`` steps: device time by kernel kind, and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    sync(args.device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.profile_steps):
            step()
    wall = (time.perf_counter() - start) / args.profile_steps
    print(f"{head}, under the profiler {wall * 1e3:.1f} ms", flush=True)
    kernels = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    if not kernels:
        print("-- no device kernels were recorded (a CPU run)")
        return
    per_step = lambda us: us / 1e3 / args.profile_steps  # noqa: E731  µs over all steps → ms per step
    busy = per_step(sum(e.self_device_time_total for e in kernels))
    print(f"-- device busy {busy:.1f} ms per step ({busy / (median * 1e3):.0%} of the median step) in "
          f"{sum(e.count for e in kernels) / args.profile_steps:.0f} kernels per step")  # fmt: skip
    if busy < 0.5 * median * 1e3:
        print("   (kernels replayed inside CUDA graphs may go unrecorded: profile --compile no-cudagraphs to see them)")
    kinds: dict[str, list[float]] = {}
    for e in kernels:
        kind = kinds.setdefault(kernel_kind(e.key), [0.0, 0.0])
        kind[0] += per_step(e.self_device_time_total)
        kind[1] += e.count / args.profile_steps
    print("| kernels | ms per step | share of device time | launches per step |\n|---|---|---|---|")
    for kind, (ms, count) in sorted(kinds.items(), key=lambda item: -item[1][0]):
        print(f"| {kind} | {ms:.2f} | {ms / busy:.1%} | {count:.0f} |")
    print("| kernel | kind | ms per step | launches per step |\n|---|---|---|---|")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.rows]:
        print(f"| {e.key[:100]} | {kernel_kind(e.key)} | {per_step(e.self_device_time_total):.2f} | "
              f"{e.count / args.profile_steps:.0f} |")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
