"""The dashboard in headless Chromium against a real `zmem serve`: pictures, verdicts, console."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ..server import Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PICTURES = ("map", "trail", "risk")

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium under the system chromedriver (selenium-manager never downloads)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"the browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt: chromium, chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def clustered(n: int, *, d: int = 16, clusters: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Tight islands of z; soft_bind is high (lambda_bind low) near each island's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(clusters, d))
    offsets = rng.normal(scale=0.5, size=(n, d))
    z = centres[rng.integers(0, clusters, size=n)] + offsets
    near = np.exp(-np.linalg.norm(offsets, axis=1) / 4)
    return [
        {
            "z": z[i].tolist(),
            "soft_bind": float(near[i]),
            "cone_vol": float(0.05 + near[i]),
            "lambda_bind": float(1 - near[i]),
            "worker": f"w{i % 3}",
        }
        for i in range(n)
    ]


def fill(url: str) -> None:
    """3,000 clustered episodes and 200 recorded queries among them into memory `default`."""
    made = clustered(3200)
    episodes, queries = made[:3000], [e["z"] for e in made[3000:]]
    with httpx.Client(base_url=url, timeout=30) as http:
        for start in range(0, len(episodes), 1000):
            r = http.post("/episodes", json={"episodes": episodes[start : start + 1000]})
            assert r.status_code == 200, r.text
        r = http.post("/neighbors", json={"z": queries, "k": 16, "record": True})
        assert r.status_code == 200, r.text


def test_the_dashboard_shows_pictures_and_verdicts(server: Server, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fill(server.url)
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 60)

    def loaded(picture: str) -> bool:
        return bool(
            driver.execute_script(
                "const img = document.getElementById(arguments[0]);"
                "return img.complete && img.naturalWidth > 0;",
                picture,
            )
        )

    wait.until(lambda _: all(loaded(p) for p in PICTURES))
    wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#diagnostics .criterion")) == 4)

    assert driver.title == "zmem dashboard"
    widths = {
        p: driver.execute_script(f"return document.getElementById('{p}').naturalWidth") for p in PICTURES
    }
    assert widths == {"map": 1200, "trail": 1200, "risk": 1200}
    verdicts = {
        c.find_element(By.CSS_SELECTOR, "h3").text.split()[-1]: c.find_element(By.CSS_SELECTOR, ".badge").text
        for c in driver.find_elements(By.CSS_SELECTOR, "#diagnostics .criterion")
    }
    assert set(verdicts) == {"density", "reliability", "convergence", "kernel"}
    # 3,000 episodes: the buffer's criteria are judged (kernel health needs recorded queries)
    assert {verdicts[c] for c in ("density", "reliability", "convergence")} <= {"PASS", "FAIL"}
    assert verdicts["density"] == "PASS"  # tight islands are far clumpier than a blob
    assert verdicts["reliability"] == "PASS"
    assert "3,000" in driver.find_element(By.ID, "stats").text
    assert "error" not in (driver.find_element(By.ID, "status").get_attribute("class") or "")

    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
