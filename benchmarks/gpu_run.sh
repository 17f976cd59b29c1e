#!/usr/bin/env bash
# The lent-GPU run of benchmarks/gpu_table.py (issue 6's table), in two steps:
#   bash benchmarks/gpu_run.sh fetch        here (with a package registry): tokamax 0.0.17 and its needs as
#                                           Python 3.12 wheels into .whl/ (ignored by git; carry it)
#   bash benchmarks/gpu_run.sh run OUT_DIR [ARGS]  on the GPU machine (no network): installs the carried wheels
#                                           into a temporary folder, then writes OUT_DIR/gpu_table.jsonl (ARGS go to
#                                           gpu_table.py, e.g. --only qlora_big for a stage the budget skipped)
# tokamax 0.0.17 imports xprof.cli.tools at import time without declaring it; where xprof is absent, a stub
# module stands in for that run only (a real install takes tokamax and xprof from the registry).
set -euo pipefail
WHEELS="tokamax==0.0.17 einshape qwix typeguard==2.13.3 immutabledict tensorboardx pydantic pydantic-core
annotated-types typing-inspection"
case "${1:-}" in
  fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $WHEELS
    ls .whl ;;
  run)
    out=${2:?usage: gpu_run.sh run OUT_DIR [ARGS]}
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    if ! PYTHONPATH="$site" python3 -c "import xprof" 2>/dev/null; then
      mkdir -p "$site/xprof/cli"
      touch "$site/xprof/__init__.py" "$site/xprof/cli/__init__.py"
      echo 'get_kernel_stats_tool = None' > "$site/xprof/cli/tools.py"
    fi
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 benchmarks/gpu_table.py --out "$out/gpu_table.jsonl" --trace /tmp/qwen-moe-trace \
      --budget-s "${BUDGET_S:-450}" "${@:3}" ;;
  *)
    echo "usage: gpu_run.sh fetch | run OUT_DIR [ARGS]" >&2
    exit 2 ;;
esac
