"""report.html in a real headless browser (Debian's Chromium, driven by Playwright): it loads with no
console error and no request beyond the file itself, its table has one row per lesion holding the
numbers of lesions.csv, its images all decode, it prints on A4 with the table whole and no crop cut
across pages, and a screenshot of it is taken.

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it), never from Playwright's
own download."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from TransferSegLib import report
from TransferSegLib.heatmaps import Detection
from TransferSegLib.models import read_card
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.pipeline import Result

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed "
                                                              "(apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
A4_TEXT_WIDTH_PX = round((210 - 2 * 12) / 25.4 * 96)  # A4 less the page's 12 mm side margins, at CSS's 96 px/inch


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def _check_page(browser, folder: Path) -> Path:
    """Open ``folder``/report.html, check it against ``folder``/lesions.csv and on A4; return its screenshot."""
    url = (folder / "report.html").resolve().as_uri()
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url, wait_until="load")
    assert problems == []
    assert [u for u in requests if not u.startswith("data:")] == [url]

    with open(folder / "lesions.csv", encoding="utf-8", newline="") as f:
        expected = list(csv.DictReader(f))
    shown = page.eval_on_selector_all("table#lesions tbody tr", """rows => rows.map(row => Object.fromEntries(
        Array.from(row.querySelectorAll('td[data-column]')).map(td => [td.dataset.column, td.innerText.trim()])))""")
    assert len(shown) == len(expected) >= 1
    for cells, row in zip(shown, expected):
        assert len(cells) >= 8
        for column, text in cells.items():
            assert text == (row[column].replace("_", " ") if column == "kind" else row[column]), (column, row)
    assert page.locator("figure.lesion").count() == min(len(expected), report.MAX_CROPS)
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 300)")
    shot = folder / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = imread(shot)
    assert pixels.shape[1] == 1366 and pixels.shape[0] > 768 and pixels[..., :3].std() > 0.05

    # on A4: nothing wider than the printed text, the crops on their own pages, none cut in two
    page.emulate_media(media="print")
    page.set_viewport_size({"width": A4_TEXT_WIDTH_PX, "height": 1000})
    assert page.evaluate("document.querySelector('table#lesions').getBoundingClientRect().right") <= A4_TEXT_WIDTH_PX
    assert page.evaluate("document.documentElement.scrollWidth") <= A4_TEXT_WIDTH_PX
    styles = page.evaluate("""() => ({crops: getComputedStyle(document.querySelector('section.crops')).breakBefore,
        figure: getComputedStyle(document.querySelector('figure.lesion')).breakInside,
        row: getComputedStyle(document.querySelector('table#lesions tbody tr')).breakInside,
        head: getComputedStyle(document.querySelector('table#lesions thead')).display})""")
    assert styles == {"crops": "page", "figure": "avoid", "row": "avoid", "head": "table-header-group"}
    pdf = page.pdf(format="A4", print_background=True)
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 2
    page.close()
    return shot


def test_the_ct_report_loads_offline_matches_lesions_csv_and_prints_on_a4(browser, tmp_path):
    volume, labels = ct_phantom(seed=4, shape=(32, 80, 80))  # five tumors
    result = Result(volume=volume, labels=labels, card=read_card("ct-liver-tumor-unet3d"), device="cpu", timings={},
                    warnings=["a warning, shown on the page"])
    result.write(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert len(summary["lesions"]["rows"]) == 5
    _check_page(browser, tmp_path / "out")


def test_the_dbt_report_loads_offline_and_matches_lesions_csv(browser, tmp_path):
    volume, lesions = dbt_phantom(seed=1, shape=(16, 128, 96))
    volume.meta.update(laterality="R", view="CC")
    detections = [Detection([int(round(v)) for v in lesion["center_kji"]], None, 0.8, lesion["box_kji"], lesion["kind"])
                  for lesion in lesions]
    card = read_card("dbt-lesion-ahnet")
    result = Result(volume=volume, labels=np.zeros(volume.shape, np.uint8), card=card, device="cpu", timings={},
                    heatmap=np.zeros(volume.shape, np.float32), detections=detections)
    report.write_report_files(result, tmp_path)
    assert result.lesions()["summary"]["nipple_ras_mm"] is not None
    _check_page(browser, tmp_path)
