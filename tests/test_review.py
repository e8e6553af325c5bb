"""The review page: its API on a real loopback server, and the page itself driven by headless Chromium
(Debian's package, through Playwright): open, label three candidates, reload, the labels are there,
concurrent tabs lose nothing, and `calibrate` reads what the page wrote."""

from __future__ import annotations

import shutil

import httpx
import pytest

from llamaduo import calibrate
from llamaduo.artifacts import Completion, Judgment
from llamaduo.config import dump_config, from_dict
from llamaduo.data import make_example
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.labels import read_labels
from llamaduo.review import ReviewServer
from llamaduo.store import RunStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCRIPT = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
PRECISION = [35, 90, 55, 20, 75, 60, 45, 80]  # candidate k answers test k // 2, sample k % 2


@pytest.fixture
def run(tmp_path):
    store = RunStore(tmp_path / "run")
    cfg = from_dict({"name": "run", "runs_dir": str(tmp_path), "service": {"model": "judge-a"},
                     "judge": {"pass_rule": {"metric": "precision", "threshold": 70}}})
    atomic_write_text(store.config_path, dump_config(cfg))
    tests = [make_example(f"Question {i}?", f"Answer {i}.", category=["math", "prose"][i % 2]) for i in range(4)]
    write_jsonl(store.test_path, tests)
    preds, rows = [], []
    for k, score in enumerate(PRECISION):
        ex, s = tests[k // 2], k % 2
        text = SCRIPT if k == 3 else f"candidate {k}"
        preds.append(Completion(prompt_id=ex.id, sample_index=s, text=text, finish_reason="length" if k == 0 else "stop"))
        rows.append(Judgment(prompt_id=ex.id, sample_index=s, judge_index=0, ok=True, similarity=score, precision=score,
                             precision_reason=f"reason {k} {SCRIPT}", judge_model="judge-a"))
    store.write_predictions(0, preds)
    store.write_judgments(0, rows)
    with ReviewServer(cfg, store) as server:
        yield cfg, store, server


def test_items_come_worst_first_and_filter_by_round_and_category(run):
    _, _, server = run
    data = httpx.get(server.url + "api/items").json()
    assert [it["scores"]["precision"] for it in data["items"]] == sorted(PRECISION)
    assert data["rounds"] == [0] and data["categories"] == ["math", "prose"] and data["threshold"] == 70
    worst = data["items"][0]
    assert worst["judge_pass"] is False and worst["reasons"][0]["reason"].startswith("reason 3")
    assert [it["length_cut"] for it in data["items"]].count(True) == 1
    only = httpx.get(server.url + "api/items", params={"category": "math", "round": 0}).json()["items"]
    assert only and {it["category"] for it in only} == {"math"}


def test_the_label_api_refuses_what_it_cannot_honour(run):
    _, store, server = run
    item = httpx.get(server.url + "api/items").json()["items"][0]
    key = {k: item[k] for k in ("round", "prompt_id", "sample_index")}
    assert httpx.post(server.url + "api/labels", json={**key, "score": 40, "reviewer": "x"}).status_code == 422
    assert httpx.post(server.url + "api/labels", json={**key, "score": 400}).status_code == 422
    assert httpx.post(server.url + "api/labels", json={**key}).status_code == 422
    assert httpx.post(server.url + "api/labels", json={**key, "prompt_id": "nope", "score": 5}).status_code == 404
    other = httpx.post(server.url + "api/labels", json={**key, "score": 5}, headers={"Origin": "http://evil.example"})
    assert other.status_code == 403 and not store.labels_path.exists()
    saved = httpx.post(server.url + "api/labels", json={**key, "agree": False}).json()["label"]
    assert saved["passed"] is True and saved["agree"] is False  # disagreeing with the judge's fail


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


@needs_chromium
def test_a_reviewer_labels_three_items_in_chromium_and_they_survive_a_reload(run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    cfg, store, server = run
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector(".item")
            cards = page.locator(".item")
            assert cards.count() == 8
            # Untrusted text is shown as text: the candidate's markup is visible, never run.
            assert page.locator(".item").nth(0).locator(".text-candidate").inner_text() == SCRIPT
            assert page.evaluate("window.pwned === undefined") and page.locator("main img").count() == 0
            # Keyboard: the first card is current; 3 scores it 30. j moves on, a agrees.
            page.locator("body").press("3")
            cards.nth(0).locator(".status.saved").wait_for()
            page.locator("body").press("j")
            page.locator("body").press("a")
            cards.nth(1).locator(".status.saved").wait_for()
            # Mouse: type a score into the third card and press its button.
            cards.nth(2).locator("input.score").fill("64")
            cards.nth(2).locator("button.save-score").click()
            cards.nth(2).locator(".status.saved").wait_for()

            page.reload()
            page.wait_for_selector(".item")
            statuses = [cards.nth(i).locator(".status").inner_text() for i in range(4)]
            assert statuses[0] == "saved: score 30"
            assert statuses[1] == "saved: agree · fail"  # the judge failed it (35 < 70) and the reviewer agreed
            assert statuses[2] == "saved: score 64" and statuses[3] == "not labelled"
            assert cards.nth(2).locator("input.score").input_value() == "64"

            # Two tabs, each labelling while the other's view is stale: both labels are kept.
            other = browser.new_page()
            other.goto(server.url)
            other.wait_for_selector(".item")
            page.locator(".item").nth(3).locator("button.disagree").click()
            other.locator(".item").nth(4).locator("button.agree").click()
            page.locator(".item").nth(3).locator(".status.saved").wait_for()
            other.locator(".item").nth(4).locator(".status.saved").wait_for()

            # The filter narrows the list.
            page.select_option("#category", "math")
            sync_api.expect(page.locator(".item")).to_have_count(4)  # (no wait_for_function: the page's CSP forbids eval)
            assert not problems, problems
        finally:
            browser.close()
    labels = read_labels(store.labels_path)
    assert len(labels) == 5
    cal = calibrate.calibrate(cfg, store)
    assert cal.labels == 5 and cal.matched == 5 and cal.judges[0].classified == 5
