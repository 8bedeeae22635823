#!/usr/bin/env bash
# The second GPU run (under 10 minutes, every step bounded with `timeout`):
#   bash benchmarks/run_full_on_gpu.sh OUTDIR [--wheels DIR] [--budget-s SECONDS]
# installs as benchmarks/run_on_gpu.sh does, then runs benchmarks/bench_flux_block.py (training step at 512 px
# batch 6, inference step at 1024 px batch 1, merged inference, coefficient cost, peak memory, and the profile of
# the training step: base block against lorweb_fast, per kernel) and, with the time left, the full layer benchmark
# grid (every METHOD.md shape, the extra M values and the N*r sweep; most important first).
# OUTDIR receives: run.log, steps.txt, bench_full.md, bench_full.tar.gz, flux_block.md, flux_block.tar.gz.
set -u -o pipefail

usage() { echo "usage: bash benchmarks/run_full_on_gpu.sh OUTDIR [--wheels DIR] [--budget-s SECONDS (<= 570)]" >&2; }

OUTDIR=""
WHEELS=""
BUDGET_S=570
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --budget-s) BUDGET_S="${2:?--budget-s needs seconds}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "run_full_on_gpu.sh: unknown option $1" >&2; usage; exit 64 ;;
    *) if [ -n "$OUTDIR" ]; then echo "run_full_on_gpu.sh: one OUTDIR only" >&2; usage; exit 64; fi
       OUTDIR="$1"; shift ;;
  esac
done
if [ -z "$OUTDIR" ]; then usage; exit 64; fi
if ! [ "$BUDGET_S" -gt 0 ] 2>/dev/null || [ "$BUDGET_S" -gt 570 ]; then
  echo "run_full_on_gpu.sh: --budget-s must be an integer in 1..570, got $BUDGET_S" >&2; exit 64
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
# shellcheck source=benchmarks/gpu_common.sh
. "$REPO/benchmarks/gpu_common.sh"
gpu_setup "$OUTDIR" "$WHEELS" "$BUDGET_S" || exit $?

WORK="$(mktemp -d)"
# The FLUX block gets about 40% of what is left, the layer grid the rest; each benchmark also gets a matching
# --total-budget-s so it stops adding rows (and still writes its record) before its step's timeout.
# (a budget of at least 0 s: with little time left the first row is still attempted, never a negative budget)
at_least_0() { echo $(( $1 > 0 ? $1 : 0 )); }
block_s=$(( $(remaining) * 4 / 10 ))
step "FLUX block benchmark (${block_s}s)" "$block_s" \
  "$PY" benchmarks/bench_flux_block.py --total-budget-s "$(at_least_0 $((block_s - 40)))" --out-dir "$WORK/block" \
  --tag flux_block
save_results "$WORK/block" flux_block
grid_s=$(( $(remaining) - 20 ))
step "layer benchmark, full grid (${grid_s}s)" "$grid_s" \
  "$PY" benchmarks/bench_mixed_lora.py --full-grid --compiled-rows target --budget-s 3 \
  --total-budget-s "$(at_least_0 $((grid_s - 40)))" \
  --out-dir "$WORK/bench" --tag bench_full --profile
save_results "$WORK/bench" bench_full
rm -rf "$WORK"
gpu_finish
