# Shared by benchmarks/run_on_gpu.sh and benchmarks/run_full_on_gpu.sh (sourced, not run):
#   gpu_setup OUTDIR WHEELS_DIR BUDGET_S   log to OUTDIR/run.log, check the GPU, install, print device + versions
#   step NAME SECONDS CMD...                run CMD under `timeout`, never past the overall budget; status to steps.txt
#   skipped NAME WHY                        a step not run: said in the log and in steps.txt (the run exits 1)
#   save WHAT CMD...                        copy or archive results into OUTDIR as WHAT; a failure is recorded in
#                                           steps.txt and the partial OUTDIR/WHAT removed
#   note TEXT, remaining, gpu_finish
# Every step is bounded by min(its own seconds, what is left of BUDGET_S), so a whole run cannot exceed BUDGET_S
# (plus the few seconds `timeout --kill-after` may add to the last step).

note() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" >&3; }

remaining() { echo $(( BUDGET_S - SECONDS )); }

step() {
  local name="$1" want="$2" left t start rc
  shift 2
  left=$(( $(remaining) - 10 ))
  t=$(( want < left ? want : left ))
  if [ "$t" -lt 5 ]; then
    skipped "$name" "budget" "$(remaining)s left"
    return 124
  fi
  note "$name: start (limit ${t}s)"
  start=$SECONDS
  timeout --kill-after=5 "$t" "$@"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "$name: TIMED OUT after ${t}s"
  else
    note "$name: exit $rc in $(( SECONDS - start ))s"
  fi
  echo "$name: rc=$rc in $(( SECONDS - start ))s (limit ${t}s)" >> "$OUTDIR/steps.txt"
  return "$rc"
}

skipped() {  # NAME WHY [DETAIL]: steps.txt gets "NAME: skipped (WHY)", which makes gpu_finish return 1
  note "$1: skipped ($2${3:+: $3})"
  echo "$1: skipped ($2)" >> "$OUTDIR/steps.txt"
}

save() {  # WHAT CMD...: a copy or an archive into OUTDIR; the files a device call brings back must not go missing
  local what="$1" rc
  shift
  "$@"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    note "saving $what FAILED (exit $rc)"
    echo "save $what: FAILED rc=$rc" >> "$OUTDIR/steps.txt"
    rm -f -- "${OUTDIR:?}/$what"  # a truncated archive or copy must not come back looking like a result
  fi
  return "$rc"
}

save_results() {  # DIR NAME: DIR/NAME.md as NAME.md, and whatever DIR holds as NAME.tar.gz (also without the table)
  if [ -f "$1/$2.md" ]; then save "$2.md" cp "$1/$2.md" "$OUTDIR/$2.md"; fi
  if compgen -G "$1/*" > /dev/null; then save "$2.tar.gz" tar -C "$1" -czf "$OUTDIR/$2.tar.gz" .; fi
}

# At exit: close every descriptor that leads to the tee of run.log and give it up to 5 s to write its last lines
# (nothing else waits for a process substitution).
flush_run_log() {
  exec 3>&- 1>&- 2>&-
  local i
  for i in $(seq 50); do
    kill -0 "${LOG_TEE_PID:-0}" 2>/dev/null || return 0
    sleep 0.1
  done
}

gpu_setup() {
  OUTDIR="$1"
  local wheels="$2"
  BUDGET_S="$3"
  SECONDS=0
  # a step killed by its timeout must not lose its last lines: Python buffers 8 KB when writing to the tee pipe
  export PYTHONUNBUFFERED=1
  PY="${PYTHON:-python3}"
  mkdir -p "$OUTDIR" || { echo "cannot create $OUTDIR" >&2; return 1; }
  OUTDIR="$(cd "$OUTDIR" && pwd)"
  : > "$OUTDIR/steps.txt"
  exec 3>&1
  exec > >(tee -a "$OUTDIR/run.log") 2>&1
  LOG_TEE_PID=$!
  exec 3>&1
  trap flush_run_log EXIT
  note "lorweb_fast GPU run in $PWD -> $OUTDIR (budget ${BUDGET_S}s)"
  if [ -n "${LORWEB_COMMIT:-}" ]; then
    note "commit: $LORWEB_COMMIT"
  else
    note "commit: LORWEB_COMMIT unset; the copy's git HEAD, which may be stale: $(git rev-parse --short HEAD 2>/dev/null \
      || echo unknown)"
  fi

  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "No usable torch for $PY (set PYTHON=...): this script needs the GPU machine's own torch." >&2
    return 2
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "No CUDA GPU is visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')):" \
         "run this on a GPU machine; nothing was installed or measured." >&2
    echo "no CUDA GPU: nothing run" >> "$OUTDIR/steps.txt"
    return 2
  fi

  # 1. carried wheels (pure-Python dependencies the machine lacks), then the package itself, offline
  if [ -z "$wheels" ]; then
    for cand in shared/wheels .whl; do
      if compgen -G "$cand/*.whl" > /dev/null; then wheels="$cand"; break; fi
    done
  fi
  if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" > /dev/null; then
    # two versions of one package make pip refuse the whole install (ResolutionImpossible): named, not installed
    local twice site="${TMPDIR:-/tmp}/lorweb_fast_site"
    twice="$(for f in "$wheels"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; done | sort | uniq -d \
      | tr '\n' ' ')"
    if [ -n "$twice" ]; then
      skipped "install carried wheels from $wheels" "several versions of: $twice" \
        "keep one wheel per package (benchmarks/collect_wheels.sh removes the older ones)"
    else
      step "install carried wheels from $wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  else
    note "no carried wheels (--wheels DIR, shared/wheels or .whl): tests that need diffusers will skip or fail"
  fi
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  note "nvcc: $(command -v nvcc || echo "${CUDA_HOME:-?}/bin/nvcc") (CUDA_HOME=${CUDA_HOME:-found by torch})"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export LORWEB_FAST_FORCE_CUDA_BUILD=1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # only the visible GPU's architecture: nvcc time saved
    local arch
    arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
    if [ -n "$arch" ]; then export TORCH_CUDA_ARCH_LIST="$arch"; fi
  fi
  if ! step "install lorweb_fast (editable, CUDA extension for ${TORCH_CUDA_ARCH_LIST:-8.0;9.0})" 200 \
      "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # a compile error in csrc/ must not cost the Triton steps: they run without the extension (its tests fail)
    note "the forced CUDA extension build failed (see above): installing without it"
    LORWEB_FAST_FORCE_CUDA_BUILD="" LORWEB_FAST_SKIP_CUDA_BUILD=1 step "install lorweb_fast without the CUDA extension" \
      60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
        note "install failed: see above"; return 1; }
  fi

  # 2. device, clocks and versions
  note "device and versions:"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
    --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import platform, torch
import lorweb_fast
props = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cudnn {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton: not importable ({exc})")
print(f"GPU {props.name}  sm_{props.major}{props.minor}  {props.multi_processor_count} SMs  "
      f"{props.total_memory / 2**30:.1f} GiB")
for name, status in lorweb_fast.backend_status().items():
    print(f"backend {name}: {status}")
EOF
  return 0
}

gpu_finish() {
  note "steps:"
  cat "$OUTDIR/steps.txt" >&3
  local n
  n=$(find "$OUTDIR" -type f | wc -l)
  note "$n files in $OUTDIR (limit 8): $(cd "$OUTDIR" && ls | tr '\n' ' ')"
  if grep -qv ": rc=0 " "$OUTDIR/steps.txt"; then
    note "some steps failed, timed out or were skipped (see above)"
    return 1
  fi
  return 0
}
