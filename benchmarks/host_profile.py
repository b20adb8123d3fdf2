"""Where the host's time goes in dpobench's training step: wall time per step, then cProfile over a few steps
(sorted by own time), for one compile setting at a time. A step that waits on the device shows it as the time of
the step's one readback (``tolist``); everything else in the listing is host work that the device may wait on.

    python benchmarks/host_profile.py --size base --pairs 8 --compile default no-cudagraphs     # on a GPU
    python benchmarks/host_profile.py --size tiny --pairs 4 --device cpu --compile off           # a smoke run
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import functools
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_ab import with_attention_mask
from benchmarks.steps import DpobenchStep, add_data_arguments, build_model, cuda_graphs_recorded, load_data, sync
from dpobench.models import SIZES

#: --compile settings: TrainConfig.compile, and TrainConfig.cuda_graphs (None: the default's rule; on CUDA graphs run
#: where the plan has few widths per step, as fixed-length data does)
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
    parser.add_argument("--share-prompt", action="store_true")
    parser.add_argument("--rows", type=int, default=30, help="lines of the profile to print")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="SDPA without its cuDNN kernels")
    parser.add_argument("--attention-mask", action="store_true",
                        help="give the decoder the batch's attention mask, as before 2026-11-27 (step_ab.py's row)")  # fmt: skip
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (dotted, e.g. triton.cudagraph_trees=False or "
                        "combo_kernels=True) to a Python literal; repeatable")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    for item in args.inductor:
        key, _, value = item.partition("=")
        *path, name = key.split(".")
        section = functools.reduce(getattr, path, torch._inductor.config)
        if not hasattr(section, name):
            parser.error(f"--inductor {item}: torch._inductor.config has no {key}")
        setattr(section, name, ast.literal_eval(value))
    if args.device.startswith("cuda"):  # why inductor skips CUDA graphs, if it does (it falls back silently)
        torch._logging.set_logs(cudagraphs=True)
    pairs, vocab, pad = load_data(args, args.pairs * (args.steps + args.profile_steps + 8))
    for setting in args.compile:
        step = DpobenchStep(build_model(args.size, vocab, "cpu"), pairs, args.pairs, args.device, pad,
                            compile=SETTINGS[setting][0], cuda_graphs=SETTINGS[setting][1])  # fmt: skip
        step.trainer.share_prompt = args.share_prompt or step.trainer.share_prompt
        if args.attention_mask:
            with_attention_mask(step.trainer.policy, pad)
        for _ in range(5):
            step()
        times = []
        for _ in range(args.steps):
            sync(args.device)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        profiler = cProfile.Profile()
        sync(args.device)
        start = time.perf_counter()
        profiler.enable()
        for _ in range(args.profile_steps):
            step()
        profiler.disable()
        wall = (time.perf_counter() - start) / args.profile_steps
        print(f"\n== {args.size}, {args.pairs} pairs, compile={setting}, share_prompt={step.trainer.share_prompt}, "
              f"cuDNN attention={not args.no_cudnn_attention}, attention mask={args.attention_mask}, "
              f"inductor {args.inductor or 'defaults'}, CUDA graphs recorded {cuda_graphs_recorded()} and skipped "
              f"{counters['inductor']['cudagraph_skips']} times so far: "
              f"median step {statistics.median(times) * 1e3:.1f} ms, under cProfile {wall * 1e3:.1f} ms", flush=True)  # fmt: skip
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.rows)
            body = text.getvalue()
            print(f"-- by {key}, per {args.profile_steps} steps\n" + body[body.find("   ncalls") :], flush=True)


if __name__ == "__main__":
    main()
