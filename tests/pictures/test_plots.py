"""Plots: valid, deterministic PNGs of the right size, without pyplot or leaked figures."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmem_service.diagnostics import projection
from zmem_service.pictures import plots
from zmem_service.pictures.plots import pca_basis, render_map, render_risk, render_trail

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def buffer(n: int, d: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    soft = rng.uniform(0, 1, n)
    cone = rng.exponential(1.0, n)
    lam = rng.exponential(1.0, n)
    return {
        "z": rng.normal(size=(n, d)).astype(np.float32),
        "soft_bind": soft,
        "cone_vol": cone,
        "lambda_bind": lam,
        "risk_target": (1 - soft) + 0.2 * np.log(cone + 1e-8) + 0.05 * lam,
    }


def test_map_is_a_1200x1000_png_and_repeats_byte_identically() -> None:
    b = buffer(300)
    first = render_map(**b, title="default")
    assert png_size(first) == (1200, 1000)
    assert render_map(**b, title="default") == first
    assert b"Matplotlib" not in first  # the varying "Software" metadata is stripped


def test_dpi_scales_the_picture() -> None:
    assert png_size(render_map(**buffer(50), title="t", dpi=50)) == (600, 500)
    assert png_size(render_trail(buffer(50)["z"], title="t", dpi=50)) == (600, 500)


@pytest.mark.parametrize("n", [0, 1])
def test_too_little_data_still_gives_a_full_size_png(n: int) -> None:
    b = buffer(n)
    assert png_size(render_map(**b, title="empty")) == (1200, 1000)
    assert png_size(render_trail(b["z"], title="empty")) == (1200, 1000)


def test_empty_without_a_dimension_is_accepted() -> None:
    empty = np.zeros(0)
    assert png_size(render_map(empty, empty, empty, empty, empty, title="t")) == (1200, 1000)
    assert png_size(render_trail(empty, title="t")) == (1200, 1000)


def test_max_points_subsamples_deterministically() -> None:
    b = buffer(400)
    small = render_map(**b, title="t", max_points=50, dpi=30)
    assert small == render_map(**b, title="t", max_points=50, dpi=30)
    assert small != render_map(**b, title="t", max_points=50, seed=1, dpi=30)
    # max_points ≥ N draws every point, so the seed changes nothing.
    z = b["z"]
    assert render_trail(z, title="t", seed=3, dpi=30) == render_trail(z, title="t", dpi=30)


def test_trail_is_deterministic_and_follows_last() -> None:
    z = buffer(1500)["z"]
    first = render_trail(z, title="t", last=200)
    assert png_size(first) == (1200, 1000)
    assert render_trail(z, title="t", last=200) == first
    assert render_trail(z, title="t", last=500) != first
    assert png_size(render_trail(z[:2], title="t", last=10_000)) == (1200, 1000)
    with pytest.raises(ValueError):
        render_trail(z, title="t", last=0)
    with pytest.raises(ValueError):
        render_trail(z, title="t", max_points=0)
    with pytest.raises(ValueError):
        render_map(**buffer(10), title="t", max_points=0)


def test_constant_and_degenerate_inputs_render() -> None:
    n = 40
    z = np.ones((n, 1))
    flat = np.zeros(n)
    assert png_size(render_map(z, flat, flat, flat, flat, title="t")) == (1200, 1000)
    assert png_size(render_trail(z, title="t")) == (1200, 1000)


def test_risk_marks_spikes_and_handles_empty() -> None:
    rng = np.random.default_rng(0)
    risk = 0.5 + 0.01 * rng.normal(size=400)
    risk[[50, 300]] = 3.0
    data = render_risk(risk, title="t")
    assert png_size(data) == (1200, 500)
    assert render_risk(risk, title="t") == data
    assert render_risk(risk, title="t", mad_k=1000.0) != data
    assert render_risk(risk, title="t", scale=1.0) != data  # the risk targets' scale sets the level
    assert png_size(render_risk(np.zeros(0), title="t")) == (1200, 500)
    assert png_size(render_risk(np.array([0.1]), title="t")) == (1200, 500)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(0, 6), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pca_basis_shapes_and_sign_convention(n: int, d: int, seed: int) -> None:
    z = np.random.default_rng(seed).normal(size=(n, d))
    mean, comps = pca_basis(z)
    assert mean.shape == (d,) and comps.shape == (2, d)
    assert np.all(np.isfinite(comps))
    for row in comps:
        if np.any(row):
            assert row[np.argmax(np.abs(row))] > 0
            assert np.isclose(np.linalg.norm(row), 1.0)
    if d == 1:
        assert not comps[1].any()
    flipped_mean, flipped = pca_basis(-z)
    np.testing.assert_allclose(flipped, comps, atol=1e-9)
    np.testing.assert_allclose(flipped_mean, -mean, atol=1e-12)


def test_pca_basis_finds_the_spread_axes() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 4)) * np.array([0.1, -5.0, 0.1, 2.0])
    mean, comps = pca_basis(z)
    np.testing.assert_allclose(np.abs(comps), [[0, 1, 0, 0], [0, 0, 0, 1]], atol=0.05)
    np.testing.assert_allclose(mean, z.mean(axis=0))
    assert not pca_basis(np.ones((4, 3)))[1].any()  # no variance, no axes
    _, two = pca_basis(np.array([[0.0, 0.0], [3.0, -4.0]]))
    np.testing.assert_allclose(two, [[-0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError):
        pca_basis(np.ones(3))


def test_big_buffers_get_the_same_basis_from_the_scatter_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(1)
    z = (rng.normal(size=(1000, 6)) * np.array([3.0, 1.0, 0.5, 2.0, 0.1, 0.2]) + 5).astype(np.float32)
    mean, comps = pca_basis(z)
    monkeypatch.setattr(projection, "_SVD_MAX_ENTRIES", 0)
    monkeypatch.setattr(projection, "_CHUNK_ROWS", 128)
    big_mean, big_comps = pca_basis(z)
    np.testing.assert_allclose(big_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(big_comps, comps, atol=1e-8)


def test_renders_leave_no_figure_managers_behind() -> None:
    from matplotlib import _pylab_helpers

    b = buffer(50, d=4)
    empty = buffer(0, d=4)
    before = len(_pylab_helpers.Gcf.get_all_fig_managers())
    # Three real pictures, then 97 cheap "no data" ones: each is a whole Figure all the same.
    render_map(**b, title="t", dpi=20)
    render_trail(b["z"], title="t", dpi=20)
    render_risk(b["soft_bind"], title="t", dpi=20)
    for i in range(97):
        if i % 3 == 0:
            render_map(**empty, title="t", dpi=20)
        elif i % 3 == 1:
            render_trail(empty["z"], title="t", dpi=20)
        else:
            render_risk(empty["soft_bind"], title="t", dpi=20)
    assert len(_pylab_helpers.Gcf.get_all_fig_managers()) == before


def test_rendering_never_imports_pyplot() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from zmem_service.pictures.plots import render_map, render_risk, render_trail

        rng = np.random.default_rng(0)
        z = rng.normal(size=(50, 4))
        v = rng.uniform(size=50)
        render_map(z, v, v, v, v, title="t", dpi=20)
        render_trail(z, title="t", dpi=20)
        render_risk(v, title="t", dpi=20)
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SERVICE_DIR)}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_view_matplotlib_cannot_draw_is_a_picture_saying_so() -> None:
    """A small memory drawn in the basis of one whose z's sit near 1e18: the projection is
    huge and the density scale can't be drawn; the answer is still a PNG (saying why)."""
    z = np.array([[i % 5, i // 5] for i in range(20)], np.float32) * 0.1
    big = (np.random.default_rng(0).standard_normal((50, 2)) * 1e17 + 1e18).astype(np.float32)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        png = plots.render_trail(z, title="t", basis_z=big)
    assert png.startswith(b"\x89PNG") and png_size(png) == (1200, 1000)
