#!/usr/bin/env bash
# The prepared GPU check (issue #10): the GPU tests, then one benchmark table, in under 5 minutes.
#
#   benchmarks/gpu_check.sh [--wheels DIR]   on a machine with an NVIDIA GPU whose python3 has torch
#                                            with CUDA; the service's other packages come from DIR
#                                            (default wheels/), installed without network
#   benchmarks/gpu_check.sh --self-test      CPU only, tiny sizes, no install: checks this script
#   benchmarks/gpu_check.sh --download-wheels [DIR]
#                                            here, with network: fetch those wheels (Python 3.12,
#                                            manylinux x86_64, versions from constraints.txt)
#
# Runs from the repository root, whatever the current directory; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=gpu
wheels=wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --self-test) mode=self-test ;;
    --download-wheels) mode=download; [ $# -gt 1 ] && [ "${2#-}" = "$2" ] && { wheels=$2; shift; } ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# What the GPU machine lacks (it has torch, numpy, httpx, safetensors, matplotlib,
# prometheus-client): the service's web stack, faiss-cpu (and threadpoolctl), and the test runner.
NEEDED="fastapi starlette pydantic pydantic_core pydantic-settings typing-inspection annotated-types
annotated-doc opentelemetry-api uvicorn h11 httptools uvloop click python-dotenv anyio sniffio idna
typing_extensions faiss-cpu threadpoolctl packaging pytest pluggy iniconfig hypothesis sortedcontainers attrs"

pinned() {  # name==version from constraints.txt for each needed package
  for name in $NEEDED; do
    pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
    line=$(grep -iE "^${pattern}==" constraints.txt || true)
    [ -n "$line" ] || { echo "gpu_check.sh: $name is not pinned in constraints.txt" >&2; exit 2; }
    echo "$line"
  done
}

export PYTHONPATH="$PWD/service:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

case "$mode" in
  download)
    mkdir -p "$wheels"
    # shellcheck disable=SC2046
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$wheels" $(pinned)
    du -sh "$wheels"
    ;;
  self-test)
    echo "== gpu_check self-test: CPU, tiny sizes, no install"
    pinned >/dev/null
    "$PY" -m benchmarks.bench_gpu --self-test
    ;;
  gpu)
    ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: no wheels in $wheels/ (run --download-wheels where there is network)" >&2; exit 2; }
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    site=${TMPDIR:-/tmp}/zmem-gpu-site
    echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels/ into $site (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
    export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # the machine's pytest plugins may not fit this pytest
    "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', ok); sys.exit(0 if ok else 1)"
    echo "== GPU tests (the CUDA cases of the torch kNN and index tests)"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or replays or graphs" tests/core/test_knn.py tests/core/test_knn_torch.py tests/core/test_knn_graphs.py tests/core/test_knn_grouped.py tests/test_torch_index.py tests/test_replica.py tests/test_replica_grouped.py || echo "GPU TESTS FAILED (status $?)"
    echo "== benchmark"
    timeout 200 "$PY" -m benchmarks.bench_gpu --device cuda
    ;;
esac
