#!/usr/bin/env bash
# Run a benchmark on the GPU machine (Python 3.12, torch from the image, no internet).
#
#   bash bench/device_run.sh --model voxcpm2 [more bench_engine.py flags]           (carry: [".whl"])
#   bash bench/device_run.sh serve --model voxcpm2 [more bench_serve.py flags]      (carry: [".whl"])
#
# The first word picks the benchmark: `serve` runs bench/bench_serve.py (the served product over HTTP:
# start_api.py, load from bench/serve_load.py); anything else (or `engine`) runs bench/bench_engine.py as before.
# Installs the carried wheels (.whl/: voxcpm, fastapi, uvicorn, pydantic, soundfile, av, ... that the image lacks;
# made here by bash bench/device_wheels.sh) into /tmp/site, which every child process (the servers, the load
# generator) inherits through PYTHONPATH; logs nvidia-smi once a second to $OUT/nvidia-smi.csv, and writes the
# results to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results}"
mkdir -p "$OUT"

script=bench/bench_engine.py
case "${1:-}" in
  serve) script=bench/bench_serve.py; shift ;;
  engine) shift ;;
esac

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: make them with bench/device_wheels.sh and run with carry: [\".whl\"]" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

smi_pid=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used,clocks.sm,clocks.mem,power.draw \
    --format=csv -l 1 >"$OUT/nvidia-smi.csv" 2>/dev/null &
  smi_pid=$!
fi
stop_smi() { if [ -n "$smi_pid" ]; then kill "$smi_pid" 2>/dev/null || true; fi; }
trap stop_smi EXIT

python3 "$script" "$@" --out-dir "$OUT"
