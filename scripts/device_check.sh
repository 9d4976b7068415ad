#!/usr/bin/env bash
# One device call on the H100: the GPU-only tests first, then each benchmark, every step bounded in
# time, every log and result under $OUT (what the device tool brings back).
#
#     bash scripts/device_wheels.sh                  # here, once: the wheels the image lacks
#     bash scripts/device_check.sh                   # in the device tool's run, carry [".whl"]: about 8 min
#     bash scripts/device_check.sh kernels e2e       # or only some steps
#
# Steps: tests (pytest -m gpu); kernels, e2e and cost (vdit-sparse bench at the Wan2.1-1.3B 480p shape).
# (The embedded model trains on the CPU now: no GPU step for it.)
# Each step's limit keeps the whole call under the tool's 10 minutes; a step cut short still leaves its
# partial log.
set -u
OUT=${OUT:?run this through the device tool, which sets OUT}
steps=${*:-tests kernels e2e cost}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
  python3 -c "import torch, triton, diffusers, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', t.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $SECONDS s in all"
    tail -n 30 "$OUT/$name.log"
}
for s in $steps; do
    case $s in
        tests) step tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
        kernels) step kernels 170 python3 -m vdit_sparse bench --kernels --shapes wan-1.3b-480p ;;
        e2e) step e2e 140 python3 -m vdit_sparse bench --e2e --shape wan-1.3b-480p --json "$OUT/e2e.json" ;;
        cost) step cost 50 python3 -m vdit_sparse bench --cost-model --shapes wan-1.3b-480p --out "$OUT/cost_model.json" ;;
        *) echo "unknown step $s: choose from tests kernels e2e cost"; exit 2 ;;
    esac
done
