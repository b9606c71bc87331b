"""Run the README's training-loop lines against a live service, in a venv with only the client extra.

Usage: python .ci/readme_client.py URL. The README's first ```python block is executed as
written (its URL pointed at URL), with the training step's names (z, loss, sb, cv, lb)
defined first; then the episode must be stored and the risk must be a differentiable
0-dim tensor. The service's libraries must be absent here.
"""

import importlib.util
import pathlib
import re
import sys

import torch

url = sys.argv[1]
readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
assert "http://127.0.0.1:8000" in code, "the README's client lines no longer name the default URL"
code = code.replace("http://127.0.0.1:8000", url)

step = {"z": torch.randn(1, 32, requires_grad=True), "loss": torch.zeros(()), "sb": 0.9, "cv": 0.3, "lb": 0.1}
exec(compile(code, "README.md", "exec"), step)  # the point: the README's lines as written
mem = step["mem"]
mem.flush(timeout=60)
stats = mem.stats()
assert stats["size"] >= 1, stats
risk = mem.risk(step["z"])
assert risk.shape == () and torch.isfinite(risk) and step["loss"].shape == (), (risk, step["loss"])
mem.close(timeout=60)

missing = [name for name in ("fastapi", "faiss", "uvicorn", "matplotlib") if importlib.util.find_spec(name)]
assert not missing, f"the client extra pulled in service libraries: {missing}"
assert not {"fastapi", "faiss", "uvicorn"} & sys.modules.keys()
print(
    f"README client lines: recorded, flushed (memory size {stats['size']}), risk {risk.item():.4f}; "
    "no fastapi, faiss, uvicorn or matplotlib installed"
)
