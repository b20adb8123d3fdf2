#!/usr/bin/env bash
# The GPU check as one command, for a lent CUDA machine (which has torch, transformers, accelerate and pyarrow but no
# network): installs dpobench and TRL from local files, then prints step_speed.py's table and the studies below.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels      # here, once: TRL 1.16 and what the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh                     # there, with .whl carried; the tables also go to $OUT
#   GPU_CHECK_PART=1 bash benchmarks/gpu_check.sh    # one part only, for a session that splits its time
#
# Parts in order, most wanted first (a session can end early); about 14 minutes on an H200 for the three of "all".
# Part 1 (about 5.5 minutes): the tables at 32 and 8 pairs per step (the default; plain; TRL; --no-compile;
# --no-cudagraphs), 20 timed steps each; then an interleaved A/B at 32 pairs (investigations/step_ab.py): the default
# against the prompt shared, without CUDA graphs, and with the LM head eager.
# Part 2 (about 5.5 minutes): varying lengths at 32 pairs, 150 steps: four cells, without graphs, with them, with them
# again and without them again (investigations/cudagraph_check.py: the break-even of CUDA_GRAPH_MIN_STEPS_PER_WIDTH,
# graphs' reuse, their numbers against two runs without); then the default and --no-cudagraphs on varying lengths,
# one process each.
# Part 3 (about 3.5 minutes): a real sweep of `small` on CUDA, by default and --no-cuda-graphs (compare_runs.py); a
# profile of 2 default steps at 32 pairs.
# The parts below are not in "all":
# Part kernels (about 5 minutes): where a 32-pair step's device time goes (investigations/host_profile.py --kernels)
# with CUDA graphs, without them, with SDPA's flash kernel only and with the prompt shared; an interleaved A/B of the
# default against the prompt shared; the 32-pair table (dpobench and plain).
# Part confirm (about 3 minutes): the 32-pair table twice, one process each, and an interleaved A/B of the default
# against the prompt shared, 20 rounds: how far repeated measurements of the headline number drift.
# Part share (about 4 minutes): whether prompt sharing pays with CUDA graphs on varying lengths too, 150 steps of 32
# pairs, each setting in a process of its own: the default, then the prompt shared.
# Run by hand where needed: investigations/sync_check.py, investigations/host_profile.py without --kernels, and
# step_speed.py --exact-widths on varying lengths (one process per row).
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
    for pairs in 32 8; do  # the 32-pair table first: issue #5's MFU target
        timeout 150 python3 benchmarks/step_speed.py --pairs $pairs --steps 20 "$@" 2>&1 \
            | grep -v "cudagraph_utils\|Recording too many" | tee "$out/gpu_check_table_$pairs.txt" \
            || echo "the $pairs-pair table did not finish within 150 s"
    done
    timeout 100 python3 benchmarks/investigations/step_ab.py --size base --data fixed --pairs 32 --rounds 10 \
        --rows "default,prompt shared,no CUDA graphs,eager head" 2>&1 | tee "$out/gpu_check_ab.txt" \
        || echo "the A/B: past 100 s"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
    timeout 170 python3 benchmarks/investigations/cudagraph_check.py "$@" 2>&1 \
        | grep -v "cudagraph_utils\|Recording too many" | tee "$out/gpu_check_cudagraph_varied.txt" \
        || echo "cudagraph_check: past 170 s"
    for impl in "dpobench" "dpobench --no-cudagraphs"; do
        # 150 steps (a cell's default) over about 10 widths: the default's rule picks graphs
        timeout 75 python3 benchmarks/step_speed.py --data varied --pairs 32 --steps 150 --no-trl --only "$impl" "$@" \
            2>&1 | grep -v "cudagraph_utils\|Recording too many" | tee -a "$out/gpu_check_varied.txt" \
            || echo "$impl on varied data: past 75 s"
    done
fi
if [ "$part" = kernels ]; then
    profile="python3 benchmarks/investigations/host_profile.py --size base --pairs 32 --kernels --steps 10"
    profile="$profile --profile-steps 3"
    timeout 130 $profile --compile default no-cudagraphs --rows 30 2>&1 | grep -v "cudagraph_utils\|Recording too many" \
        | tee "$out/kernels_default.txt" || echo "the default's kernel profile: past 130 s"
    for extra in "--sdpa flash" "--share-prompt"; do
        timeout 80 $profile --compile default --rows 12 $extra 2>&1 | grep -v "cudagraph_utils\|Recording too many" \
            | tee -a "$out/kernels_settings.txt" || echo "the kernel profile $extra: past 80 s"
    done
    timeout 100 python3 benchmarks/investigations/step_ab.py --size base --data fixed --pairs 32 --rounds 10 \
        --rows "default,prompt shared" 2>&1 | tee "$out/gpu_check_ab.txt" || echo "the A/B: past 100 s"
    timeout 90 python3 benchmarks/step_speed.py --pairs 32 --steps 20 --only dpobench,plain --no-trl 2>&1 \
        | grep -v "cudagraph_utils\|Recording too many" | tee "$out/gpu_check_table_32.txt" \
        || echo "the 32-pair table: past 90 s"
fi
if [ "$part" = confirm ]; then
    for run in 1 2; do
        timeout 80 python3 benchmarks/step_speed.py --pairs 32 --steps 20 --only dpobench,plain --no-trl 2>&1 \
            | grep -v "cudagraph_utils\|Recording too many" | tee -a "$out/gpu_check_table_32.txt" \
            || echo "the 32-pair table: past 80 s"
    done
    timeout 100 python3 benchmarks/investigations/step_ab.py --size base --data fixed --pairs 32 --rounds 20 \
        --rows "default,prompt shared" 2>&1 | tee "$out/gpu_check_ab.txt" || echo "the A/B: past 100 s"
fi
if [ "$part" = share ]; then
    for impl in "dpobench" "dpobench --share-prompt"; do
        timeout 100 python3 benchmarks/step_speed.py --data varied --pairs 32 --steps 150 --no-trl --share-prompt \
            --only "$impl" "$@" 2>&1 | grep -v "cudagraph_utils\|Recording too many" | tee -a "$out/gpu_check_share.txt" \
            || echo "$impl on varied data: past 100 s"
    done
fi
if [ "$part" = all ] || [ "$part" = 3 ]; then
    for mode in --cuda-graphs --no-cuda-graphs; do
        rm -rf "/tmp/run$mode"
        start=$(date +%s)
        timeout 150 python3 -m dpobench run --device cuda --model small --variants dpo,ipo,simpo --no-report "$mode" \
            --out "/tmp/run$mode" > "$out/run$mode.txt" 2>&1 || echo "dpobench run $mode failed or ran past 150 s"
        echo "dpobench run --model small $mode: $(($(date +%s) - start)) s wall"
        tail -6 "$out/run$mode.txt"
    done
    python3 benchmarks/compare_runs.py /tmp/run--no-cuda-graphs /tmp/run--cuda-graphs 2>&1 | tee "$out/compare.txt"
    timeout 60 python3 benchmarks/step_speed.py --pairs 32 --only "dpobench" --no-trl --profile 2 "$@" 2>&1 \
        | tee "$out/gpu_check_profile.txt" || echo "the profile did not finish within 60 s"
fi
