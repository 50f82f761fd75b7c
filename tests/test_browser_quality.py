"""Team-scale features in a real browser (Playwright + Debian's Chromium): gold pairs marked by the admin,
swapped re-asks, the per-annotator dashboard, pausing an annotator and the login throttle.

Screenshots go to the test's tmp dir and to /tmp/app_screens/ (names 20_* and up).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_browser_app import log_in, open_page, shot  # noqa: E402

from app.backend import Store  # noqa: E402
from app.testing import serve  # noqa: E402

pytestmark = pytest.mark.browser
N, N_GOLD = 14, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pairs whose better reply starts with 'Good'; the last N_GOLD are to be marked gold in the UI."""
    d = tmp_path_factory.mktemp("quality")
    url = f"sqlite:///{d}/prefs.db"
    s = Store(url).init()
    for name, role in (("careful", "annotator"), ("lefty", "annotator"), ("root", "admin")):
        s.add_annotator(name, f"pw-{name}", role)
    gold = {}
    for i in range(N + N_GOLD):
        pid = s.add_prompt(f"Question {i}: what is {i} + {i}?")
        good, bad = s.add_response(pid, f"Good: {i} + {i} = {2 * i}."), s.add_response(pid, f"Bad: it is {2 * i + 1}.")
        a, b = (good, bad) if i % 2 else (bad, good)
        cid = s.add_comparison(pid, a, b, priority=float(100 - i))
        if i >= N:
            gold[cid] = "a" if a == good else "b"
    with serve(url, overlap=2, gold_rate=0.25, reask_rate=0.25, reask_gap=2) as (demo, address):
        yield s, address, gold


def label_everything(page, pick, limit: int = 60) -> int:
    """Click A or B (``pick(left_text, right_text)`` -> 'a' | 'b') until the queue is empty; returns the clicks."""
    done = "() => { const e = document.querySelector('#al-refresh'); return !!(e && e.offsetParent !== null); }"
    for n in range(limit):
        page.wait_for_timeout(250)  # let the page apply the last answer
        if page.evaluate(done):
            return n
        left, right = page.inner_text("#al-left"), page.inner_text("#al-right")
        with page.expect_response(lambda r: "/gradio_api/" in r.url and r.request.method == "POST"):
            page.click(f"#btn-{pick(left, right)}")
    raise AssertionError("the queue never emptied")


def test_gold_reasks_dashboard_and_pause(browser, world, tmp_path):
    store, address, gold = world
    # the admin marks the gold pairs in Admin → Gold pairs
    actx, admin = open_page(browser, address)
    log_in(admin, "root", "pw-root")
    admin.get_by_role("tab", name="Admin").click()
    admin.get_by_role("tab", name="Gold pairs").click()
    for answer in ("a", "b"):
        ids = ", ".join(str(c) for c, ans in gold.items() if ans == answer)
        admin.fill("#al-gold-ids textarea", ids)
        admin.locator("#al-gold-answer").get_by_label(answer, exact=True).check()
        admin.click("#al-gold-mark")
        admin.wait_for_function("a => document.querySelector('#al-gold-msg').innerText.includes(`answer '${a}'`)",
                                arg=answer, timeout=10_000)
    assert store.gold() == gold
    shot(admin, tmp_path, "20_admin_gold_pairs")

    # two annotators: one reads the replies, one always clicks A (the left side)
    cctx, careful = open_page(browser, address)
    log_in(careful, "careful", "pw-careful")
    label_everything(careful, lambda left, right: "a" if left.startswith("Good") else "b")
    lctx, lefty = open_page(browser, address)
    log_in(lefty, "lefty", "pw-lefty")
    label_everything(lefty, lambda left, right: "a")
    shot(careful, tmp_path, "21_annotator_done")
    q = {r["name"]: r for r in store.annotator_quality()}
    c, lf = q["careful"], q["lefty"]
    assert c["labels"] - c["gold_n"] == N and lf["labels"] - lf["gold_n"] == N  # every queued pair, once
    assert c["gold_n"] >= 1 and c["gold_accuracy"] == 1.0 and c["reasks_n"] >= 1 and c["self_consistency"] == 1.0
    assert lf["left_share"] == 1.0 and lf["reasks_n"] >= 1 and lf["self_consistency"] == 0.0
    for r in store.reasks():  # a re-ask shows the pair with the sides swapped
        assert r["left_side"] != r["first_left"]

    # the dashboard shows each annotator; the admin pauses lefty
    admin.get_by_role("tab", name="Dashboard").click()
    admin.click("#al-dash-refresh")
    admin.wait_for_function("() => document.querySelector('#al-quality').innerText.includes('lefty')", timeout=15_000)
    text = admin.inner_text("#al-quality")
    assert "careful" in text and "100%" in text
    admin.fill("#al-who textarea", "lefty")
    admin.click("#al-pause")
    admin.wait_for_function("() => document.querySelector('#al-who-msg').innerText.includes('Paused')",
                            timeout=10_000)
    admin.wait_for_timeout(800)
    shot(admin, tmp_path, "22_admin_annotator_dashboard")
    assert store.get_annotator("lefty").paused
    lefty.click("#al-refresh")
    lefty.wait_for_function("() => document.querySelector('#al-empty-text').innerText.includes('Paused')",
                            timeout=10_000)
    shot(lefty, tmp_path, "23_annotator_paused")
    for ctx in (actx, cctx, lctx):
        ctx.close()


def test_login_throttle_in_the_browser(browser, world, tmp_path):
    _, address, _ = world
    ctx, page = open_page(browser, address)
    for _ in range(3):
        log_in(page, "careful", "wrong", expect_ok=False)
        page.wait_for_timeout(300)
    page.wait_for_function("() => document.querySelector('#al-login-msg').innerText.includes('Too many failed')",
                           timeout=10_000)
    log_in(page, "careful", "pw-careful", expect_ok=False)  # the right password, too soon: refused
    page.wait_for_timeout(500)
    assert not page.is_visible("#btn-a") and "wait" in page.inner_text("#al-login-msg")
    shot(page, tmp_path, "24_login_throttled")
    ctx.close()
