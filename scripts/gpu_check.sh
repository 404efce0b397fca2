#!/usr/bin/env bash
# GPU readiness check (issue 12, item 8): run on a CUDA machine, no downloads, < 8 minutes on H100/H200.
#   (a) tiny random models, fp32 on the GPU: greedy exactness of generate() ar / sd / ssd and of the
#       batching Engine at batch 1 and 4 (ar, sd; sd with chunked prefill; ssd through the batched
#       draft worker) against each sequence's own ar run, a seeded sampled engine run equal at batch
#       1 and 4, and at most one CUDA sync per engine round (torch.cuda.set_sync_debug_mode);
#   (b) random-weight models of the Qwen2.5-Coder 1.5B / 0.5B shapes, bf16: NativeRunner.forward timed
#       for rows {1,8,32} x tokens {1,5} (the draft also at 64 and 256 rows: a batch's speculation
#       branches), written as a cost table (default gpu_costs.json) for
#       `specserve simulate RESULTS --costs gpu_costs.json [--batch 1 | 8 | 32]`.
# Usage: scripts/gpu_check.sh [OUT.json] [extra gpu_check flags, e.g. --device cuda:1 --reps 20]
#   CPU smoke run of the same code (tiny shapes): scripts/gpu_check.sh /tmp/costs.json --device cpu --quick
# Env: PYTHON (default: python), LIMIT_S (default 480). Exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-gpu_costs.json}
shift || true
LIMIT_S=${LIMIT_S:-480}

if [[ " $* " != *" --device cpu "* ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "FAIL: $PY's torch sees no CUDA GPU (the CPU smoke run is: scripts/gpu_check.sh OUT.json --device cpu --quick)"
    echo "SUMMARY: gpu_check did not run"
    exit 1
fi
timeout "$LIMIT_S" env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m specserve.tools.gpu_check --out "$OUT" "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "FAIL: gpu_check ran past ${LIMIT_S} s (see the last PASS/FAIL lines above)"
elif [ "$rc" -eq 0 ]; then
    echo "gpu_check: ALL PASS; cost table in $OUT (feed it to: specserve simulate RESULTS.json --costs $OUT --batch 8)"
else
    echo "gpu_check: FAILED (exit $rc)"
fi
exit "$rc"
