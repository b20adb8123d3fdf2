#!/usr/bin/env bash
# Issue #5's GPU check as one command, for a lent H100/H200 (which has torch, transformers, accelerate and pyarrow
# but no network): installs dpobench and TRL from local files, then prints step_speed.py's table.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels      # here, once: TRL 1.16 and what the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh                     # there, with .whl carried; the table also goes to $OUT
#   GPU_CHECK_PART=1 bash benchmarks/gpu_check.sh    # the first half only (then GPU_CHECK_PART=2)
#
# In order, most wanted first (a session can end early). Part 1: where a step synchronises (sync_check.py, CUDA's
# own sync debug mode); an interleaved A/B at 32 pairs (step_ab.py: the default step; the prompt shared, the CPU's
# default and not yet CUDA's; the old mid-step finiteness check; the old attention mask; all of the old); at 32
# pairs per step, one table of dpobench as `dpobench run` trains by default (compiled on CUDA), plain, TRL and
# dpobench --no-compile, with a profile of 2 default steps; CUDA graphs beside plain. Part 2: the same table and CUDA
# graphs at 8 pairs; on pairs of varying length at 32 pairs per step, the default, --no-compile and CUDA graphs
# beside plain. Each batch size runs in its own process. About 9.5 minutes on an H200 for both parts.
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
part="${GPU_CHECK_PART:-all}"  # 1 or 2: half each (about 5 and 4.5 minutes), for a session that must split its time
if [ "$part" != 2 ]; then
    timeout 60 python3 benchmarks/sync_check.py 2>&1 | tee "$out/gpu_check_syncs.txt" || echo "sync_check did not finish"
    timeout 150 python3 benchmarks/step_ab.py --size base --data fixed --pairs 32 --rounds 10 \
        --rows "default,prompt shared,synced,attention mask,as before" 2>&1 | tee "$out/gpu_check_ab.txt" \
        || echo "the A/B did not finish within 150 s"
fi
# each batch size in its own process, so that torch.compile specialises to its shape (fixed-length data); then
# torch.compile's CUDA graphs (mode="reduce-overhead"), not a dpobench default yet, beside plain
for pairs in 32 8; do
    if { [ "$pairs" = 32 ] && [ "$part" = 2 ]; } || { [ "$pairs" = 8 ] && [ "$part" = 1 ]; }; then continue; fi
    profile=$([ "$pairs" = 32 ] && echo "--profile 2" || true)
    timeout 200 python3 benchmarks/step_speed.py --pairs "$pairs" $profile "$@" 2>&1 \
        | tee "$out/gpu_check_$pairs.txt" || echo "the $pairs-pair table did not finish within 200 s"
    share=$([ "$pairs" = 32 ] && echo "--share-prompt" || true)
    timeout 150 python3 benchmarks/step_speed.py --cudagraphs $share --pairs "$pairs" "$@" \
        --only "dpobench --cudagraphs,plain,dpobench --cudagraphs --share-prompt" 2>&1 \
        | tee "$out/gpu_check_cudagraphs_$pairs.txt" || echo "CUDA graphs at $pairs pairs: past 150 s"
done
# varying lengths (half to all of 256 + 127 tokens): the compiled default meets dynamic shapes; CUDA graphs round
# each batch's width up to a multiple of 16, and record graphs for each width
if [ "$part" != 1 ]; then
    timeout 150 python3 benchmarks/step_speed.py --data varied --pairs 32 --steps 30 --cudagraphs --no-trl \
        --only "dpobench,plain,dpobench --no-compile,dpobench --cudagraphs" "$@" 2>&1 \
        | tee "$out/gpu_check_varied.txt" || echo "the varied-length table did not finish within 150 s"
fi
