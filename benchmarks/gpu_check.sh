#!/usr/bin/env bash
# Issue #5's GPU check as one command, for a lent H100/H200 (which has torch, transformers, accelerate and pyarrow
# but no network): installs dpobench and TRL from local files, then prints step_speed.py's table.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels      # here, once: TRL 1.16 and what the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh                     # there, with .whl carried; the table also goes to $OUT
#
# First one table (dpobench, plain, TRL at 8 and 32 pairs per step; each row also printed as soon as it is measured)
# and a profile of 3 dpobench steps at 8 pairs (within 210 s); then dpobench --compile beside plain, with a profile
# (within 180 s); then torch.compile's CUDA graphs (mode="reduce-overhead") beside plain (within 140 s). Under 9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
    exit
fi
site=/tmp/dpobench-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" .
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
out="${OUT:-/tmp}"
timeout 210 python3 benchmarks/step_speed.py --profile 3 "$@" 2>&1 | tee "$out/gpu_check.txt" \
    || echo "the table did not finish within 210 s"
# compilation after the table and bounded, so that a slow compile cannot cost the table above
timeout 180 python3 benchmarks/step_speed.py --compile --only "dpobench --compile,plain" --profile 2 "$@" 2>&1 \
    | tee "$out/gpu_check_compile.txt" || echo "the --compile run did not finish within 180 s"
timeout 140 python3 benchmarks/step_speed.py --cudagraphs --only "dpobench --cudagraphs,plain" "$@" 2>&1 \
    | tee "$out/gpu_check_cudagraphs.txt" || echo "the CUDA-graphs run did not finish within 140 s"
