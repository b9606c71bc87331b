"""The memory's numbers where a researcher already looks: TensorBoard or Weights & Biases.

`log_to(writer, step, reg=..., mem=...)` writes, under `zmem/`:

- from a `Regularizer`: the last `mem_loss`, `mem_risk`, `mem_n` and `w_mem`, the last
  measured `task_force` and `risk_force`, and `force_ratio` (the w_mem at which they balance);
- with `verdicts=True`, from `mem.diagnostics()`: one scalar per criterion, 1 passed / 0 not
  (none while it cannot judge yet; a request to the service: call it every few hundred
  steps, not every step);
- with `images=True`: `map.png` (another request) as an image.

`writer` is duck-typed, so neither library is a dependency: anything with `add_scalar(tag,
value, step)` (torch's `SummaryWriter`) or `log(dict, step=...)` (a W&B run). Returns the
scalars it wrote, so a plain `print` works as a third writer.
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import ZMemClient
    from ._risk import Regularizer

PREFIX = "zmem/"


def log_to(
    writer: Any,
    step: int,
    *,
    reg: Regularizer | None = None,
    mem: ZMemClient | None = None,
    verdicts: bool = False,
    images: bool = False,
) -> dict[str, float]:
    """Write the numbers of the module docstring to `writer` at `step`; → the scalars written."""
    scalars: dict[str, float] = {}
    if reg is not None:
        for key, values in reg.history.items():
            if values:
                scalars[key] = float(values[-1])
        ratio = reg.force_ratio()
        if ratio is not None:
            scalars["force_ratio"] = ratio
    if mem is not None and verdicts:
        for criterion in mem.diagnostics().get("criteria", []):
            if criterion.get("passed") is None:  # not enough data to judge yet
                continue
            name = str(criterion.get("name", "criterion")).replace(" ", "_")
            scalars[f"verdict/{name}"] = 1.0 if criterion["passed"] else 0.0
    tagged = {PREFIX + key: value for key, value in scalars.items()}
    if hasattr(writer, "add_scalar"):
        for tag, value in tagged.items():
            writer.add_scalar(tag, value, step)
    elif hasattr(writer, "log"):
        writer.log(tagged, step=step)
    else:
        raise TypeError(f"log_to: {type(writer).__name__} has neither add_scalar (TensorBoard) nor log (W&B)")
    if mem is not None and images:
        _image(writer, PREFIX + "map", mem.map_png(), step)
    return scalars


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _image(writer: Any, tag: str, png: bytes, step: int) -> None:
    """A PNG as the writer takes images: TensorBoard's encoded-image summary (no decoding, so
    no image library), or a W&B `Image` from a file."""
    if hasattr(writer, "_get_file_writer"):  # torch.utils.tensorboard.SummaryWriter
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    elif hasattr(writer, "log"):
        import wandb

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "map.png")
            with open(path, "wb") as f:
                f.write(png)
            writer.log({tag: wandb.Image(path)}, step=step)
