#!/usr/bin/env bash
# The prepared GPU run: one call on a machine with one NVIDIA GPU, at most 9.5 minutes in all
# (the parts' time limits: 240 + 90 + 240 s; about 5 minutes expected).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # from the repository root
#
# Writes under $OUT (default benchmarks/results/gpu_<card>): info.txt (card, driver, torch),
# tests.txt (the test suite's CUDA cases, `pytest -k cuda`: every test taking the `device`
# fixture, the no-host-read step under torch.cuda.set_sync_debug_mode("error") and one
# torch.compile graph included), checks.json (CUDA equivalence against fp64 on CPU for fp32 /
# TF32 / bf16 matmuls, non-finite skipping, and host syncs per step counted under
# set_sync_debug_mode("warn")), step_time.md (benchmarks/step_time.py on CUDA: Dion fp32, TF32
# and bf16 matmuls at ranks 1, 1/4, 1/16 against torch.optim.Muon and AdamW) and log.txt
# (everything printed). Each part has its own time limit, so one that hangs or fails does not
# cost the others. Needs pytest (the test extra) beside a CUDA build of torch.
#
#   DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_check.sh  # the same parts on CPU, tiny sizes
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
card=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>/dev/null || echo none)
slug=$(echo "$card" | tr -c 'A-Za-z0-9\n' '_')
OUT=${OUT:-benchmarks/results/gpu_$slug}
mkdir -p "$OUT"
log="$OUT/log.txt"
: >"$log"
{
  date -u '+%Y-%m-%d %H:%M UTC'
  echo "card: $card"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  git log -1 --format='commit %H %s' 2>/dev/null
} | tee "$OUT/info.txt" >>"$log"
dev=cuda layers=12 repeats=10 tests=cuda
if [ -n "${DRY_RUN:-}" ]; then dev=cpu layers=1 repeats=1 tests="cpu and numerics"
elif [ "$card" = none ]; then echo "no CUDA device: nothing to check" | tee -a "$log"; exit 2; fi

status=0
# the test files with a test taking the device fixture (no other module needs collecting)
files=$(grep -lE "def test_[a-z0-9_]*\(.*\bdevice\b" tests/test_*.py)
echo "== tests (pytest -k '$tests')" | tee -a "$log"
timeout 240 $PY -m pytest $files -q -o addopts="" -p no:cacheprovider -k "$tests" \
  >"$OUT/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/tests.txt" | tee -a "$log"
echo "== checks (equivalence, host syncs)" | tee -a "$log"
timeout 90 $PY benchmarks/gpu_check.py --device $dev --out "$OUT/checks.json" >>"$log" 2>&1 \
  || status=1
echo "== step time" | tee -a "$log"
timeout 240 $PY benchmarks/step_time.py --device $dev --layers $layers --repeats $repeats --tf32 \
  --out "$OUT/step_time.md" >>"$log" 2>&1 || status=1
tail -n 30 "$log"
echo "exit status $status; results in $OUT"
exit $status
