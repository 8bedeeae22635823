#!/usr/bin/env bash
# Download, on a machine with internet, the pure-Python wheels that the GPU machine lacks, so that
# benchmarks/run_on_gpu.sh can install lorweb_fast there without any download:
#   bash benchmarks/collect_wheels.sh [DIR (default shared/wheels)] [--with-bitsandbytes] [--python-version 3.12]
# Only the missing packages are fetched (--no-deps): diffusers, importlib_metadata and optimum-quanto (the official
# fp8 quantization, --quantize-base qfloat8; pure Python, 0.2 MB), at the versions installed in
# this environment when it has them. bitsandbytes (a ~60 MB binary wheel, over half of what a device call carries)
# only with --with-bitsandbytes. DIR is git-ignored: never commit wheels.
set -eu -o pipefail

DIR="shared/wheels"
PYVER="3.12"
WITH_BNB=0
while [ $# -gt 0 ]; do
  case "$1" in
    --with-bitsandbytes) WITH_BNB=1; shift ;;
    --python-version) PYVER="${2:?--python-version needs a value such as 3.12}"; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    -*) echo "collect_wheels.sh: unknown option $1" >&2; exit 64 ;;
    *) DIR="$1"; shift ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

pin() {  # NAME DEFAULT -> NAME==installed version (or DEFAULT)
  local v
  v="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true)"
  echo "$1==${v:-$2}"
}

# importlib_metadata at a fixed version, not this environment's: 9+ imports lazy_importer, which the GPU image lacks
PKGS=("$(pin diffusers 0.42.1)" "importlib_metadata==8.7.0" "$(pin optimum-quanto 0.2.7)")
if [ "$WITH_BNB" -eq 1 ]; then PKGS+=("$(pin bitsandbytes 0.49.0)"); fi

mkdir -p "$DIR"
NEW="$(mktemp -d)"
trap 'rm -rf "$NEW"' EXIT
echo "downloading ${PKGS[*]} for CPython $PYVER manylinux x86_64"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d "$NEW" "${PKGS[@]}"
# every download succeeded: only now are other versions of these packages removed from DIR (one wheel per package;
# two would make the GPU machine's pip refuse the whole install)
for spec in "${PKGS[@]}"; do
  name="${spec%%==*}"; version="${spec#*==}"
  prefix="$(echo "$name" | tr 'A-Z.-' 'a-z__')"
  for old in "$DIR"/*.whl; do
    [ -e "$old" ] || continue
    base="$(basename "$old")"
    if [ "$(echo "${base%%-*}" | tr 'A-Z.-' 'a-z__')" = "$prefix" ] && [[ "$base" != "${base%%-*}-$version-"* ]]; then
      echo "removing $old (another version than $version)"
      rm -f "$old"
    fi
  done
done
mv -f "$NEW"/*.whl "$DIR"/
echo "wheels in $DIR:"
ls "$DIR"
du -sh "$DIR"
echo "carry it to the GPU machine with the working tree (it is git-ignored), then:"
echo "  bash benchmarks/run_on_gpu.sh OUTDIR --wheels $DIR"
