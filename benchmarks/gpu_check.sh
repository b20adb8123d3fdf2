#!/usr/bin/env bash
# Issue #5's GPU check as one command, for a lent H100/H200 (which has torch, transformers, accelerate and pyarrow
# but no network): installs dpobench and TRL from local files, then prints step_speed.py's table.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels      # here, once: TRL 1.16 and what the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh                     # there, with .whl carried; the table also goes to $OUT
#   GPU_CHECK_PART=1 bash benchmarks/gpu_check.sh    # one part only (1, 2 or 3), for a session that splits its time
#
# In order, most wanted first (a session can end early). About 12 minutes on an H200 for all three parts.
# Part 1 (about 4 minutes): CUDA graphs at 32 pairs per step beside plain, in both layouts, with the graphs recorded
# counted (on 2026-11-27 a bug kept the mode from torch.compile, so none ran; TORCH_LOGS=cudagraphs says why inductor
# skips any); then an interleaved A/B at 32 pairs of the default step against the same with the LM head's softmax
# and gradient eager, as before the compiled head (2026-11-27, third GPU session).
# Part 2 (about 4.5 minutes): pairs of varying length at 32 pairs per step, the default (widths rounded up to 16),
# exact widths and --no-compile, each in its own process beside plain (a process pays once per new shape, so rows
# must not share one); then the table at 8 pairs per step (default, plain, TRL, --no-compile, CUDA graphs).
# Part 3 (about 3.5 minutes): the table at 32 pairs per step with a profile of 2 default steps; where a CUDA-graph
# step's host time goes (host_profile.py).
# Measured already on 2026-11-27 and left to run by hand: benchmarks/sync_check.py, and step_ab.py's prompt-sharing
# A/B on fixed lengths.
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
part="${GPU_CHECK_PART:-all}"
if [ "$part" = all ] || [ "$part" = 1 ]; then
    TORCH_LOGS=cudagraphs timeout 150 python3 benchmarks/step_speed.py --cudagraphs --share-prompt --pairs 32 "$@" \
        --only "dpobench --cudagraphs,plain,dpobench --cudagraphs --share-prompt" > "$out/gpu_check_cudagraphs_32.txt" \
        2>&1 || echo "CUDA graphs at 32 pairs: past 150 s"
    grep -v "cudagraph_trees\|__cudagraphs" "$out/gpu_check_cudagraphs_32.txt" || true
    grep -i "skipping" "$out/gpu_check_cudagraphs_32.txt" | sort | uniq -c | cut -c1-400 || true
    timeout 100 python3 benchmarks/step_ab.py --size base --data fixed --pairs 32 --rounds 10 \
        --rows "default,eager head" 2>&1 | tee "$out/gpu_check_ab_head.txt" || echo "the head A/B: past 100 s"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
    for impl in "dpobench" "dpobench --exact-widths" "dpobench --no-compile"; do
        timeout 100 python3 benchmarks/step_speed.py --data varied --pairs 32 --steps 30 --no-trl --exact-widths \
            --only "$impl,plain" "$@" 2>&1 | tee -a "$out/gpu_check_varied.txt" || echo "$impl on varied data: past 100 s"
    done
    timeout 150 python3 benchmarks/step_speed.py --pairs 8 --cudagraphs "$@" 2>&1 | tee "$out/gpu_check_8.txt" \
        || echo "the 8-pair table did not finish within 150 s"
fi
if [ "$part" = all ] || [ "$part" = 3 ]; then
    timeout 150 python3 benchmarks/step_speed.py --pairs 32 --profile 2 "$@" 2>&1 | tee "$out/gpu_check_32.txt" \
        || echo "the 32-pair table did not finish within 150 s"
    timeout 90 python3 benchmarks/host_profile.py --pairs 32 --compile reduce-overhead --steps 10 --profile-steps 2 \
        --rows 20 > "$out/gpu_check_host_cudagraphs.txt" 2>&1 || echo "host_profile did not finish within 90 s"
    grep -v "cudagraph_trees\|__cudagraphs" "$out/gpu_check_host_cudagraphs.txt" | head -40 || true
fi
