"""A sweep on a CPU shared with another torch process: its wall time with and without a competitor, side by side
(the default for small models) and one cell at a time on every thread.

The competitor is a second Python process multiplying 512 × 512 float32 matrices on torch's default threads until
it is stopped, as another training job would. Each configuration runs quiet, then loaded, into fresh output folders
sharing one cache (warmed first); the ratio loaded / quiet is what a user sees when something else runs.

    python benchmarks/investigations/shared_cpu.py --variants dpo,ipo,simpo,cpo,hinge,robust_dpo --steps 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITOR = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = torch.tanh(x @ x / 512)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="dpo,ipo,simpo,cpo,hinge,robust_dpo")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dpobench-shared-"))
    env = {**os.environ, "DPOBENCH_CACHE": os.environ.get("DPOBENCH_CACHE", str(scratch / "cache"))}

    def sweep(out: str, *extra: str) -> float:
        command = [sys.executable, "-m", "dpobench", "run", "--variants", args.variants, "--steps", str(args.steps),
                   "--no-report", "--step-cost-rounds", "0", "--out", str(scratch / out), *extra]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    sweep("warm-up")
    rows = []
    for name, extra in (("side by side (default)", ()), ("one at a time, all threads", ("--parallel-cells", "1"))):
        quiet = sweep(f"{name}-quiet", *extra)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
        try:
            time.sleep(2)  # the competitor is up and spinning
            loaded = sweep(f"{name}-loaded", *extra)
        finally:
            competitor.kill()
            competitor.wait()
        rows.append((name, quiet, loaded))
    cells = len(args.variants.split(","))
    print(f"{cells} cells of {args.steps} steps, tiny, {os.cpu_count()} cores; wall s of `dpobench run` (no report)")
    print("| sweep | quiet | beside a torch process | loaded / quiet |\n|---|---|---|---|")
    for name, quiet, loaded in rows:
        print(f"| {name} | {quiet:.1f} | {loaded:.1f} | {loaded / quiet:.2f} |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
