#!/usr/bin/env bash
# One command for a GPU machine (finishes in under 9 minutes; every step is bounded with `timeout`):
#   bash benchmarks/run_on_gpu.sh OUTDIR [--wheels DIR] [--budget-s SECONDS]
# (set LORWEB_COMMIT=<hash of the sending checkout>, written into the command before it is sent: a copied tree's
# git metadata can be stale)
#
#  1. installs lorweb_fast against the machine's own torch, without downloading anything: the missing pure-Python
#     dependencies (diffusers, ...) come as wheels from DIR (default: shared/wheels, else .whl; fill it with
#     benchmarks/collect_wheels.sh on a machine with internet), and the package itself is installed with
#     --no-deps --no-build-isolation --no-index, building the CUDA extension for this GPU's architecture;
#  2. prints the device, clocks and versions;
#  3. runs `pytest -m gpu` (all failures, up to 25; xdist and per-test timeouts when installed);
#  4. writes the AOT report (python -m lorweb_fast.aot, when present) and the resources of the kernels as the driver
#     loaded them (registers, spills, shared memory);
#  5. runs the target benchmark (bf16, M=8192, 3072->3072, N=32, r=4) and the host time per call;
#  6. runs a bounded tuning sweep (benchmarks/tune_kernels.py, when present) with the time that is left: the backward
#     roles (shrink_dy, expand_dx), which no sweep has covered yet, of the token-wise layers; the summary beside
#     the written table gives each role's time with the committed tiles and with the best candidate.
#
# OUTDIR receives at most 8 files: run.log, pytest_gpu.txt, resources.json, aot.tar.gz, bench_target.md,
# bench_target.tar.gz (JSON record, plot, profiler table, host_overhead.*), tune.tar.gz, steps.txt (exit status of
# every step).
# Without a CUDA GPU it exits with status 2 and says so. The full grid is benchmarks/run_full_on_gpu.sh.
set -u -o pipefail

usage() { echo "usage: bash benchmarks/run_on_gpu.sh OUTDIR [--wheels DIR] [--budget-s SECONDS (<= 530)]" >&2; }

OUTDIR=""
WHEELS=""
BUDGET_S=530
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --budget-s) BUDGET_S="${2:?--budget-s needs seconds}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "run_on_gpu.sh: unknown option $1" >&2; usage; exit 64 ;;
    *) if [ -n "$OUTDIR" ]; then echo "run_on_gpu.sh: one OUTDIR only" >&2; usage; exit 64; fi; OUTDIR="$1"; shift ;;
  esac
done
if [ -z "$OUTDIR" ]; then usage; exit 64; fi
if ! [ "$BUDGET_S" -gt 0 ] 2>/dev/null || [ "$BUDGET_S" -gt 530 ]; then
  echo "run_on_gpu.sh: --budget-s must be an integer in 1..530, got $BUDGET_S" >&2; exit 64
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
# shellcheck source=benchmarks/gpu_common.sh
. "$REPO/benchmarks/gpu_common.sh"
gpu_setup "$OUTDIR" "$WHEELS" "$BUDGET_S" || exit $?

# 3. the GPU test suite: every failure of one run is worth more than the first one (device time is scarce), so no -x
#    but --maxfail; 4 pytest-xdist workers when the machine has xdist (Triton compiles on the CPU: 16 cores there),
#    and a per-test limit when it has pytest-timeout, so one hung test cannot eat the step
PYTEST_EXTRA=(--maxfail 25)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_EXTRA+=(-n 4); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_EXTRA+=(--timeout 150); fi
step "pytest -m gpu ${PYTEST_EXTRA[*]}" 240 \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider "${PYTEST_EXTRA[@]}" tests/ > "$OUTDIR/pytest_gpu.txt" 2>&1
tail -n 15 "$OUTDIR/pytest_gpu.txt"

# 4. AOT report (lorweb_fast.aot) and the driver's view of the loaded kernels
WORK="$(mktemp -d)"
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('lorweb_fast.aot') is None)" 2>/dev/null; then
  major_minor="$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')"
  # the report is kept when a check fails too (the run where it matters most)
  step "AOT report (sm_$major_minor)" 90 "$PY" -m lorweb_fast.aot --arch "$major_minor" --out "$WORK/aot"
  if [ -d "$WORK/aot" ]; then save aot.tar.gz tar -C "$WORK" -czf "$OUTDIR/aot.tar.gz" aot; fi
else
  note "AOT report: skipped (lorweb_fast.aot is not in this checkout)"
fi
step "loaded-kernel resources" 60 "$PY" benchmarks/kernel_resources.py --out "$OUTDIR/resources.json"

# 5. the target benchmark
step "target benchmark (bf16, M=8192, 3072->3072)" 150 \
  "$PY" benchmarks/bench_mixed_lora.py --m 8192 --shapes 3072x3072 --no-rank-sweep --budget-s 4 \
  --out-dir "$WORK/bench" --tag bench_target --profile
# host time per call (what eager, launch-bound calls pay besides the kernels), with a cProfile of the launchers
step "host overhead per call" 75 "$PY" benchmarks/host_overhead.py --out "$WORK/bench/host_overhead" --profile
# whatever the two steps wrote comes back, also when the benchmark stopped before its table
save_results "$WORK/bench" bench_target

# 6. the bounded tuning sweep, with what is left of the budget
if [ -f benchmarks/tune_kernels.py ]; then
  tune_s=$(( $(remaining) - 25 ))
  if [ "$tune_s" -gt 120 ]; then tune_s=120; fi
  if [ "$tune_s" -ge 20 ]; then
    mkdir -p "$WORK/tune"
    step "tuning sweep, backward roles (${tune_s}s)" $((tune_s + 15)) \
      "$PY" benchmarks/tune_kernels.py --kernels shrink_dy expand_dx --layers 15360:3072 3072:3072 12288:3072 \
      3072:12288 --budget-s "$tune_s" --out "$WORK/tune/sm${major_minor:-90}.json"
    # the tuner rewrites its table after every shape: keep what a stopped sweep finished
    if compgen -G "$WORK/tune/*" > /dev/null; then save tune.tar.gz tar -C "$WORK" -czf "$OUTDIR/tune.tar.gz" tune; fi
  else
    skipped "tuning sweep, backward roles" "budget" "only $(remaining)s of the budget left"
  fi
else
  note "tuning sweep: skipped (benchmarks/tune_kernels.py is not in this checkout)"
fi
rm -rf "$WORK"
gpu_finish
