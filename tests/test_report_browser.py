"""The static results browser (dalg.report): content from an evaluation's per-set result, the page on disk,
and the page in a real headless Chromium driven by selenium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when absent)
and the dev extra ``selenium``. Without them it FAILS, so CI can never pass by skipping it; on a machine
without Chromium set ``DALG_SKIP_BROWSER=1`` to skip it. The screenshot is kept in ``artifacts/report_browser.png``
(git-ignored) and in the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from dalg.data.revisited import load_ground_truth
from dalg.data.synthetic import HELDOUT_NAME
from dalg.lit.module import RetrievalModule
from dalg.report.attention import model_attention, overlays
from dalg.report.browser import write_report
from dalg.report.content import from_search, from_set_result
from dalg.retrieval.metrics import evaluate_revisited
from tests.conftest import REPO
from tests.test_retrieval_eval import (
    _compose_eval,
    _eval_module,
    _overrides,
    tiny_ckpt,  # noqa: F401  (fixture: a checkpoint made in the test)
)

SKIP_ENV = "DALG_SKIP_BROWSER"
CHROMIUM = ("chromium", "chromium-browser")
ARTIFACTS = REPO / "artifacts"


def _set_result(gnd, ranks, query_paths, database_paths, boxes=None, name="toy"):
    """An evaluation set's result as dalg.retrieval.evaluation.SetResult carries it (duck-typed here)."""
    scores = evaluate_revisited(np.asarray(ranks), gnd, n_database=len(database_paths))
    return SimpleNamespace(
        name=name,
        scores=scores,
        ranks=np.asarray(ranks),
        protocol={"ranking": "full", "database": len(database_paths), "options": {"top_k": None}},
        query_paths=list(query_paths),
        query_boxes=boxes,
        database_paths=list(database_paths),
        gnd=gnd,
    )


def test_labels_missed_positives_and_order() -> None:
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2]},  # ranked 3 2 0 4 1: AP_M < 1
        {"easy": [4], "hard": [], "junk": []},  # easy at rank 1: AP 1
        {"easy": [], "hard": [5], "junk": []},  # its positive is beyond the 5 kept ranks
    ]
    ranks = [[3, 2, 0, 4, 1], [4, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    db = [f"/db/img{i}.jpg" for i in range(6)]
    rs = from_set_result(_set_result(gnd, ranks, ["/q/a.jpg", "/q/b.jpg", "/q/c.jpg"], db), top_k=2)

    q0 = rs.queries[0]
    assert [(h.db, h.rank, h.label) for h in q0.results] == [(3, 1, "negative"), (2, 2, "junk")]
    assert [(h.db, h.rank, h.label) for h in q0.missed] == [(0, 3, "easy"), (1, 5, "hard")]
    assert rs.queries[1].missed == [] and rs.queries[1].ap["M"] == 1.0
    assert [(h.db, h.rank, h.label) for h in rs.queries[2].missed] == [(5, None, "hard")]
    assert rs.queries[2].ap["E"] is None  # no easy positive: skipped in setup E, not 0
    # worst first by AP Medium: query 2 (AP 0), query 0, then query 1 (AP 1)
    assert [q.index for q in rs.worst_first()] == [2, 0, 1]
    # positives at places 1 and 3 once junk is removed (trapezoid AP 1/3); query 2's lies outside the ranking
    assert q0.ap["M"] == pytest.approx(1 / 3) and rs.queries[2].ap["M"] == 0.0
    assert rs.table["M"]["mAP"] == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)


def test_bad_result_shapes_are_named() -> None:
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    res = _set_result(gnd, [[0, 1]], ["/q/a.jpg"], ["/db/0.jpg", "/db/1.jpg"], name="mine")
    res.ranks = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="set mine: ranks of shape"):
        from_set_result(res)
    with pytest.raises(ValueError, match="search s: ranks"):
        from_search("s", ["/q/a.jpg"], np.zeros((1, 3)), np.zeros((1, 2)), [], [])


def test_overlays_check_shapes() -> None:
    image = np.zeros((8, 6, 3), np.uint8)
    panels = overlays({"image": image, "spatial attention": np.ones((8, 6))})
    assert [t for t, _ in panels] == ["image", "spatial attention"]
    r, g, b = np.asarray(panels[1][1])[0, 0]
    assert r > 50 and g == b == 0  # jet at 1.0 is dark red, blended half over black
    with pytest.raises(ValueError, match="'spatial attention' is"):
        overlays({"image": image, "spatial attention": np.ones((4, 4))})


def test_missing_images_are_listed_not_broken(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "q.jpg")
    Image.new("RGB", (30, 40), (10, 200, 10)).save(tmp_path / "a.jpg")
    db = [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")]
    rs = from_search("mine", [str(tmp_path / "q.jpg")], [[1, 0]], [[0.9, 0.5]], db, ["a.jpg", "gone.jpg"])
    page = write_report(tmp_path / "report", [rs]).read_text(encoding="utf-8")
    assert "1 problem (images not shown)</summary>" in page and "gone.jpg: file does not exist" in page
    assert page.count('<div class="missing"') == 1  # a placeholder, never an <img> that fails to load
    assert len(re.findall(r'<img loading="lazy" src="thumbs/', page)) == 1
    assert "<td>0.9000</td>" in page  # the search table: top-1 score and name


@pytest.fixture(scope="module")
def heldout_report(tiny_synthetic, tiny_ckpt, tmp_path_factory):  # noqa: F811
    """The report of the tiny held-out set: a fixed ranking, query boxes, the tiny model's attention."""
    gt = load_ground_truth(tiny_synthetic / "heldout", HELDOUT_NAME)
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(gt.n_database) for _ in range(gt.n_queries)])
    ranks[0] = np.concatenate([gt.gnd[0]["easy"], [i for i in ranks[0] if i not in gt.gnd[0]["easy"]]])
    result = _set_result(
        gt.gnd,
        ranks,
        [gt.query_path(i) for i in range(gt.n_queries)],
        [gt.database_path(i) for i in range(gt.n_database)],
        boxes=[g["bbx"] for g in gt.gnd],
        name="synthetic_heldout",
    )
    rs = from_set_result(result, top_k=5)
    net = RetrievalModule.for_evaluation(tiny_ckpt).net
    out = tmp_path_factory.mktemp("report")
    page = write_report(out, [rs], title="tiny report", attention=model_attention(net, 64))
    return page, rs, gt


def test_page_on_disk(heldout_report) -> None:
    page, rs, gt = heldout_report
    text = page.read_text(encoding="utf-8")
    assert text.count('<tr data-target="') == gt.n_queries
    srcs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert srcs and not [s for s in srcs if s.startswith(("/", "http:", "https:", "file:"))]  # all relative
    for s in srcs:
        if s.startswith(("thumbs/", "queries/", "attention/")):
            assert (page.parent / s).is_file(), s
        else:  # links to the original photos, relative to the page
            assert (page.parent / s).resolve().is_file(), s
    assert "images not shown" not in text  # every image was found


def test_eval_writes_the_browser(tiny_ckpt, tiny_synthetic, tmp_path) -> None:  # noqa: F811
    """eval.py report_html=true: the page beside the JSON, one row per query in the JSON's worst-first order."""
    over = _overrides(tiny_ckpt, tiny_synthetic) + ["report_html=true", "report.attention_size=48"]
    report = _eval_module().evaluate(_compose_eval(over, tmp_path))
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    (name, res), *_ = report["sets"].items()
    ap = {s: [np.nan if v is None else v for v in res["per_query_ap"][s]] for s in ("E", "M", "H")}
    rows = [int(q) for q in re.findall(r'<tr data-target="[^"]+" data-q="(\d+)"', page)]
    assert sorted(rows) == list(range(len(ap["M"])))
    m = np.array(ap["M"])[rows]
    assert np.all(np.diff(m[~np.isnan(m)]) >= 0)  # worst first by AP Medium
    assert f"{res['scores']['mAP_M']:.2f}" in page  # the E/M/H table
    assert page.count('<div class="qbox"') == len(rows)  # cropped queries: each shows its box
    assert page.count('<div class="attention">') == len(rows) and "images not shown" not in page


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): pip install -e '.[dev]', or {SKIP_ENV}=1 to skip")
    binary = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver_bin = shutil.which("chromedriver")
    if binary is None or driver_bin is None:
        pytest.fail(
            "Chromium or chromedriver not found: apt-get install -y chromium chromium-driver "
            f"(.ci/run does), or set {SKIP_ENV}=1 to skip this test locally"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver_bin))


@pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1: no browser on this machine")
def test_page_in_headless_chromium(heldout_report, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page, rs, gt = heldout_report
    driver = _driver()
    try:
        driver.get(page.as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table.queries tbody tr")
        assert len(rows) == gt.n_queries
        worst = [q.index for q in rs.worst_first()]
        assert [int(r.get_attribute("data-q")) for r in rows] == worst
        assert not driver.find_elements(By.CSS_SELECTOR, ".detail.shown")  # nothing shown before a click

        target = worst[1]
        rows[1].click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".detail.shown"))
        shown = driver.find_elements(By.CSS_SELECTOR, ".detail.shown")
        assert len(shown) == 1 and shown[0].is_displayed()
        assert int(shown[0].get_attribute("data-q")) == target
        entry = rs.queries[target]
        tiles = shown[0].find_elements(By.CSS_SELECTOR, ".results .tile")
        assert [t.get_attribute("data-label") for t in tiles] == [h.label for h in entry.results]
        assert [int(t.get_attribute("data-db")) for t in tiles] == [h.db for h in entry.results]
        missed = shown[0].find_elements(By.CSS_SELECTOR, ".missed .tile")
        assert [int(t.get_attribute("data-db")) for t in missed] == [h.db for h in entry.missed]
        box = shown[0].find_element(By.CSS_SELECTOR, ".qbox")
        assert box.is_displayed() and box.size["width"] > 0
        assert len(shown[0].find_elements(By.CSS_SELECTOR, ".attention img")) >= 2  # image + a map
        # every image of the shown query loaded (lazy images load once visible; wait for them)
        loaded = (
            "return Array.from(arguments[0].querySelectorAll('img'))"
            ".every(i => i.complete && i.naturalWidth > 0);"
        )
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(loaded, shown[0]))
        assert "selected" in rows[1].get_attribute("class")

        # a second click on another row swaps the shown query; the URL remembers it
        rows[0].click()
        anchor = f"#synthetic_heldout-q{worst[0]}"
        WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith(anchor))
        shown = driver.find_elements(By.CSS_SELECTOR, ".detail.shown")
        assert [int(s.get_attribute("data-q")) for s in shown] == [worst[0]]

        shot = tmp_path / "report_browser.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, ARTIFACTS / "report_browser.png")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR", "WARNING")]
        assert not errors, errors
    finally:
        driver.quit()
