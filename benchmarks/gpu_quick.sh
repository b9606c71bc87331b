#!/usr/bin/env bash
# The GPU check within a short device budget: the CUDA tests and the benchmark table, fewer repeats.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
site=${TMPDIR:-/tmp}/zmem-gpu-site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" wheels/*.whl
export PYTHONPATH="$PWD/service:$PWD/client:$site" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
echo "== GPU tests"
timeout 100 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/core/test_knn.py tests/core/test_knn_torch.py tests/test_torch_index.py tests/test_replica.py 2>&1 | tail -5
echo "== benchmark"
timeout 150 "$PY" -m benchmarks.bench_gpu --device "${DEVICE:-cuda}" --repeats 30 --risk-repeats 200 "$@"
