"""The map and the trail on the risk projection: other axes than the PCA map, same contracts."""

from __future__ import annotations

import numpy as np
import pytest

from zmem_service.pictures.plots import render_map, render_trail

from .test_plots import buffer, png_size


def test_the_risk_projection_draws_other_axes_deterministically() -> None:
    b = buffer(300)
    pca = render_map(**b, title="t", dpi=40)
    risk = render_map(**b, title="t", dpi=40, projection="risk")
    assert png_size(risk) == png_size(pca) and risk != pca
    assert render_map(**b, title="t", dpi=40, projection="risk") == risk
    trail = render_trail(b["z"], title="t", dpi=40, projection="risk", risk_target=b["risk_target"])
    assert trail != render_trail(b["z"], title="t", dpi=40)
    other = buffer(200, seed=1)
    in_other = render_map(
        **b, title="t", dpi=40, projection="risk", basis_z=other["z"], basis_risk_target=other["risk_target"]
    )
    assert in_other not in (risk, pca)


def test_the_risk_projection_needs_its_risk_targets_and_a_known_name() -> None:
    b = buffer(100)
    with pytest.raises(ValueError, match="projection"):
        render_map(**b, title="t", projection="tsne")
    with pytest.raises(ValueError, match="risk targets"):
        render_trail(b["z"], title="t", projection="risk")
    with pytest.raises(ValueError, match="risk targets"):
        render_map(**b, title="t", projection="risk", basis_z=b["z"])
    # too little data still says so, whatever the projection
    few = buffer(1)
    assert png_size(render_map(**few, title="t", dpi=40, projection="risk")) == (480, 400)
    assert np.isfinite(b["risk_target"]).all()
