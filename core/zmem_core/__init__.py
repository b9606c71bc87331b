"""zmem_core: the contract the service and the client share, written once.

- `names`: the memory-name rule.
- `limits`: the limits both sides enforce (batch rows, k, z_dim, capacity, σ range,
  squared norm of z, id and worker lengths).
- `params`: what a query's `k` and `sigma` resolve to, `sigma: "auto"`'s schedule included.
- `kernel`: the seed's Gaussian-kernel statistics per query row (risk, Σw, n_eff).
- `wire`: the safetensors body format (arrays as tensors, other values as JSON literals).
- `knn`, `knn_torch`: the exact kNN (squared L2, ties by the lower seq) and its certificate.
- `knn_grouped`: the fixed-shape, sync-free torch search over a group-aligned base (the
  service's torch index); `knn_graphs`: that search replayed from CUDA graphs.

`zmem_service` and `zmem_client` import this package; it imports neither (an
import-linter contract in pyproject.toml says so). Importing `zmem_core` loads numpy
only: modules that need more (`wire`: safetensors; `knn`: FAISS; `knn_torch`,
`knn_grouped`, `knn_graphs`: torch) are imported by name where they are used, never
from here. `__version__` is the installed distribution's.
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("zmem")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
"""The installed distribution's version (pyproject.toml's, the one place it is written)."""
