#!/usr/bin/env bash
# Does torch.compile pay on a real sweep? Two `dpobench run`s of the same variants on a CUDA GPU (the synthetic
# task, varying lengths, so dynamic shapes): --no-compile and --compile, compared per variant by compare_runs.py;
# then a profile of the compiled base-size step at 32 pairs.
#
#   bash benchmarks/investigations/gpu_compile_check.sh               # the tiny model; about 4 minutes; logs in $OUT
#   MODEL=small bash benchmarks/investigations/gpu_compile_check.sh   # VARIANTS=dpo,ipo picks the variants
set -euo pipefail
cd "$(dirname "$0")/../.."
site=/tmp/dpobench-site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" .
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
variants="${VARIANTS:-dpo,ipo,simpo,orpo,robust_dpo,discopop}"
for mode in --no-compile --compile; do  # eager first: it also pays for building the SFT model and the task data
    rm -rf "/tmp/run$mode"
    start=$(date +%s)
    timeout 170 python3 -m dpobench run --device cuda --model "${MODEL:-tiny}" --variants "$variants" --no-report \
        "$mode" --out "/tmp/run$mode" \
        >"$out/run$mode.txt" 2>&1 || echo "dpobench run $mode failed or ran past 170 s"
    echo "dpobench run $mode: $(($(date +%s) - start)) s wall"
    tail -12 "$out/run$mode.txt"
done
python3 benchmarks/compare_runs.py /tmp/run--no-compile /tmp/run--compile 2>&1 | tee "$out/compare.txt"
timeout 90 python3 benchmarks/step_speed.py --compile --only "dpobench --compile,plain" --pairs 32 --profile 2 \
    --no-trl 2>&1 | tee "$out/profile32.txt" || echo "the profile did not finish within 90 s"
