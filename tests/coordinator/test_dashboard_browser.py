"""The dashboard in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`,
driven by Selenium) against a real coordinator process with real agent processes.

While the page stays open, a federation runs two rounds: the live view shows the round in
flight (updates received / expected, a deadline counting down, the straggler by name), the
page updates without a reload, the charts draw (checked on a screenshot), a federation
name made of markup shows as text, an agent is revoked from its button, and the export
report downloads. scripts/setup.sh installs the browser (as root).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import PROCESS_ADMIN_TOKEN, PROCESS_ENROLL_TOKEN, Cluster, wait_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
MISSING = [what for what, ok in [("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER),
                                 ("selenium", HAVE_SELENIUM)] if not ok]
if MISSING and os.environ.get("CI") == "true":  # CI runs setup.sh as root: missing means broken
    raise RuntimeError(f"{', '.join(MISSING)} missing although scripts/setup.sh installs them")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed "
                                "(scripts/setup.sh installs them when run as root)")

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'
ACCURACY_BLUE = (0x15, 0x65, 0xC0)  # the accuracy series' colour in dashboard.py


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1400,2200"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                           "downloadPath": str(tmp_path / "downloads")})
    yield driver
    driver.quit()


def _text(driver: Any, css: str) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(5):  # the page replaces its nodes every refresh: a found node may go stale before it is read
        try:
            return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))
        except StaleElementReferenceException:
            time.sleep(0.05)
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))


def _click(driver: Any, css: str) -> None:
    """Click `css`, again if the 2 s refresh replaced the element under us."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, css).click() or True, 5, interval=0.1,
             what=f"a click on {css}", ignore=(StaleElementReferenceException,))


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)  # (H, W, 3)


def _coloured_pixels(png: bytes, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(_pixels(png) - np.array(rgb)) <= tol).all(axis=-1).sum())


def _non_background_pixels(png: bytes) -> int:
    return int((_pixels(png).mean(axis=-1) < 235).sum())


def test_dashboard_follows_a_live_federation(cluster: Cluster, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # Arrange: two agent processes, plus an enrolled identity that never trains (the
    # straggler: selected, silent until the deadline); a running and a hostile federation
    for i in range(2):
        cluster.start_agent(i, 2)
    straggler = cluster.http.post("/v1/agents/enroll", json={"enrollment_token": PROCESS_ENROLL_TOKEN,
                                                             "name": "straggler"}).json()["agent_id"]
    cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 3, "3 agents enrolled")
    fed = cluster.http.post("/v1/federations", json={
        "name": "live-run", "model": "lenet5", "rounds": 2, "clients_per_round": 3, "min_clients": 2,
        "round_deadline_s": 8, "data": {"dataset": "synthetic", "eval_samples": 200},
        "training": {"batch_size": 32, "lr": 0.05, "max_steps": 4}}).json()
    fid = fed["id"]
    hostile = cluster.http.post("/v1/federations", json={"name": HOSTILE, "data": {"dataset": "synthetic"}}).json()

    browser.get(cluster.url + "/")
    browser.find_element(By.ID, "tok").send_keys(PROCESS_ADMIN_TOKEN)
    browser.find_element(By.ID, "show").click()
    wait_for(lambda: "live-run" in _text(browser, "#feds h2"), 15, interval=0.2, what="the first render")
    browser.execute_script("window.__sameDocument = 'yes'")  # gone if the page reloads

    # Act: start the federation with the page open
    assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200
    live = f'[data-live="{fid}"]'

    # Assert: the live view shows round 1 waiting on the straggler, its deadline counting down
    def waiting_on_straggler() -> bool:
        t = _text(browser, live)  # the agents that uploaded are no longer listed
        return "round 1 in flight" in t and "2/3" in t and t.endswith("waiting for: straggler")

    wait_for(waiting_on_straggler, 60, interval=0.2, what="round 1 with 2/3 updates", details=cluster.logs)
    first = int(_text(browser, live + " .countdown").split()[0])
    time.sleep(2.2)
    second = int(_text(browser, live + " .countdown").split()[0])
    assert 0 <= second < first <= 8, (first, second)

    # ...revoke takes two clicks and reaches the API (so round 2 does not wait for the straggler)
    button = f'[data-revoke="{straggler}"]'
    _click(browser, button)
    assert _text(browser, button) == "confirm revoke"  # the armed state survives the refresh
    _click(browser, button)
    cluster.wait(lambda: {a["id"]: a["status"] for a in cluster.http.get("/v1/agents").json()}[straggler] == "revoked",
                 "the revoke", 20)
    wait_for(lambda: "revoked" in _text(browser, f'[data-agent="{straggler}"]'), 10, interval=0.2, what="revoked row")

    # ...the page follows the federation to its end without a reload, and the table fills
    wait_for(lambda: f"({fid}, completed, round 2/2" in _text(browser, "#feds h2"), 60, interval=0.3,
             what="the page to show completion", details=cluster.logs)
    assert browser.execute_script("return window.__sameDocument") == "yes"
    rows = browser.find_elements(By.CSS_SELECTOR, f'[data-federation="{fid}"] table tr')
    assert len(rows) == 1 + 2  # header + two rounds

    # ...the charts draw one point per round, visibly (a screenshot, not just the DOM)
    acc = browser.find_element(By.CSS_SELECTOR, f'[data-federation="{fid}"] svg[data-chart="accuracy"]')
    assert len(acc.find_elements(By.CSS_SELECTOR, "circle")) == 2
    assert _coloured_pixels(acc.screenshot_as_png, ACCURACY_BLUE) > 40
    for name in ("loss", "traffic", "density", "macs", "memory"):
        chart = browser.find_element(By.CSS_SELECTOR, f'[data-federation="{fid}"] svg[data-chart="{name}"]')
        assert len(chart.find_elements(By.CSS_SELECTOR, "polyline")) >= 2, name  # axes + a series
        assert _non_background_pixels(chart.screenshot_as_png) > 600, name

    # ...the markup name is text: no element made from it, no script of it ran
    box = f'[data-federation="{hostile["id"]}"]'
    assert _text(browser, box + " h2").startswith(HOSTILE)
    assert browser.find_elements(By.CSS_SELECTOR, f"{box} img, {box} script, {box} b") == []
    assert browser.execute_script("return window.__pwned === undefined")

    # ...the export report downloads through the token-carrying fetch
    browser.save_screenshot(str(tmp_path / "dashboard.png"))  # kept with the test's logs
    _click(browser, f'[data-federation="{fid}"] [data-export="export_report.json"]')
    report = tmp_path / "downloads" / "export_report.json"
    wait_for(report.is_file, 90, interval=0.3, what="the downloaded report", details=cluster.logs)
    assert "macs" in json.dumps(json.loads(report.read_text())).lower()

    # ...and the strict CSP was never violated, no script error
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert problems == []
