"""Ray executor against the in-process sweep: wall time of the same sweep, the two in turn, as ratios.

Each round runs `dpobench run` four times into fresh output folders, sharing one cache (the SFT model and the
reference log-probs, built by a warm-up run first): in-process one cell at a time with every core's threads
(torch's default), the same with ``--threads`` threads (what one Ray worker has), in-process as by default (small
cells side by side, one thread each: ``--parallel-cells`` auto), and with
`--executor ray` on a Ray of ``--workers`` × ``--threads`` CPUs (``ray start --head --num-cpus``, joined with
``--ray-address``), each cell asking for ``--threads``. The Ray run's wall time includes starting and stopping Ray
and its workers. Ray runs inside a new network namespace (``unshare --net``, only ``lo`` up) so that it listens on
nothing but loopback.

    python benchmarks/ray_scaling.py                      # 12 cells, 2 workers × 1 thread, 2 rounds
    python benchmarks/ray_scaling.py --workers 8 --threads 2 --cells 32 --device cuda --cells-per-gpu 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dpobench


def sweep(variants: list[str], out: Path, steps: int, device: str) -> list[str]:
    return [sys.executable, "-m", "dpobench", "run", "--variants", ",".join(variants), "--steps", str(steps),
            "--device", device, "--out", str(out), "--no-report"]  # fmt: skip


def on_ray(command: list[str], cpus: int) -> list[str]:
    """``command`` joined to a Ray of ``cpus`` CPUs started for it, in a network namespace of its own."""
    ray = Path(sys.executable).parent / "ray"
    script = (f"ip link set lo up && {ray} start --head --node-ip-address 127.0.0.1 --port 6379 --num-cpus {cpus} "
              '--include-dashboard false --disable-usage-stats >/dev/null 2>&1 && "$@" --ray-address 127.0.0.1:6379; '
              f"status=$?; {ray} stop --force >/dev/null 2>&1; exit $status")  # fmt: skip
    return ["unshare", "--net", "sh", "-c", script, "sh", *command]


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs = workers × threads")
    parser.add_argument("--threads", type=int, default=1, help="threads per cell on Ray")
    parser.add_argument("--cells-per-gpu", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("unshare") is None:
        sys.exit("needs unshare (util-linux) to keep Ray on loopback")
    variants = list(dpobench.get_losses())[: args.cells]
    scratch = Path(tempfile.mkdtemp(prefix="dpobench-ray-"))
    # RAY_AUTH_MODE: the cluster lives in a network namespace of its own, which nothing else can reach
    env = {
        **os.environ,
        "DPOBENCH_CACHE": str(scratch / "cache"),
        "DPOBENCH_LOAD_PLUGINS": "",
        "RAY_AUTH_MODE": "disabled",
    }
    ray_options = ["--executor", "ray", "--threads-per-cell", str(args.threads)]
    if args.device.startswith("cuda"):
        ray_options += ["--cells-per-gpu", str(args.cells_per_gpu)]
    timed(sweep(variants[:1], scratch / "warm-up", args.steps, args.device), env)  # SFT model, pairs, reference
    here, narrow, side, ray = [], [], [], []
    one_at_a_time = ["--parallel-cells", "1"]
    for round_ in range(args.rounds):
        here.append(timed(sweep(variants, scratch / f"here-{round_}", args.steps, args.device) + one_at_a_time, env))
        one_worker = {**env, "OMP_NUM_THREADS": str(args.threads)}
        command = sweep(variants, scratch / f"narrow-{round_}", args.steps, args.device) + one_at_a_time
        narrow.append(timed(command, one_worker))
        side.append(timed(sweep(variants, scratch / f"side-{round_}", args.steps, args.device), env))
        command = sweep(variants, scratch / f"ray-{round_}", args.steps, args.device) + ray_options
        ray.append(timed(on_ray(command, args.workers * args.threads), env))
    columns = [
        here,
        narrow,
        side,
        ray,
        *([r / o for r, o in zip(ray, other, strict=True)] for other in (here, narrow, side)),
    ]
    print(f"{args.cells} cells of {args.steps} steps on {args.device}; Ray: {args.workers} workers × {args.threads} "
          f"thread(s); in-process: torch's default threads ({os.cpu_count()} cores)")  # fmt: skip
    print(f"| round | in-process wall s | in-process, {args.threads} thread(s), wall s | in-process side by side "
          f"wall s | Ray wall s | Ray / in-process | Ray / in-process on {args.threads} thread(s) | Ray / side by "
          "side |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for round_, row in enumerate(zip(*columns, strict=True), start=1):
        print(f"| {round_} | " + " | ".join(f"{v:.{2 if i > 3 else 1}f}" for i, v in enumerate(row)) + " |")
    medians = [statistics.median(column) for column in columns]
    print("| median | " + " | ".join(f"{v:.{2 if i > 3 else 1}f}" for i, v in enumerate(medians)) + " |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
