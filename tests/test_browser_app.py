"""The labelling app in a real browser: Playwright driving Debian's Chromium.

Chromium: ``$ALIGN_CHROMIUM`` or /usr/bin/chromium (``apt-get install chromium``); skipped otherwise.
Screenshots go to the test's tmp dir and are copied to /tmp/app_screens/.
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.backend import Store  # noqa: E402
from app.testing import seed_store, serve  # noqa: E402

pytestmark = pytest.mark.browser

SCREENS = Path("/tmp/app_screens")
N_PAIRS = 5  # + the XSS pair + the chat pair


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{d}/prefs.db"
    seed_store(url, n_pairs=N_PAIRS)
    store = Store(url)
    for name in ("carol", "dave"):
        store.add_annotator(name, f"pw-{name}", "annotator")
    with serve(url, overlap=3) as (demo, address):
        yield store, address


def shot(page, tmp_path: Path, name: str, full: bool = True) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS / path.name)


def open_page(browser, address: str):
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    page.goto(address)
    page.wait_for_selector("#al-name textarea", timeout=20_000)
    return ctx, page


def log_in(page, name: str, password: str, expect_ok: bool = True) -> None:
    page.fill("#al-name textarea", name)
    page.fill("#al-password input", password)
    page.click("#al-login-btn")
    if expect_ok:
        page.wait_for_selector("#btn-a", state="visible", timeout=10_000)


def done_count(page) -> int:
    return int(page.inner_text(".al-progress-text b"))


def wait_done(page, n: int) -> None:
    page.wait_for_function(f"() => {{ const b = document.querySelector('.al-progress-text b');"
                           f" return b && b.innerText === '{n}'; }}", timeout=10_000)


def test_wrong_password_is_refused(browser, app, tmp_path):
    ctx, page = open_page(browser, app[1])
    shot(page, tmp_path, "01_login")
    log_in(page, "alice", "not-her-password", expect_ok=False)
    page.wait_for_function("() => document.querySelector('#al-login-msg').innerText.includes('Wrong')")
    assert not page.is_visible("#btn-a")
    shot(page, tmp_path, "02_wrong_password")
    ctx.close()


def test_label_with_buttons_keys_undo_skip_and_no_script_runs(browser, app, tmp_path):
    store, address = app
    ctx, page = open_page(browser, address)
    log_in(page, "alice", "pw-alice")
    # the first pair carries <script> and <img onerror>: shown as text, nothing runs
    cards = page.inner_text("#al-left") + page.inner_text("#al-right")
    assert "<script>window.__pwned=1</script>" in cards and 'onerror="window.__pwned=1"' in cards
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#al-left img, #al-right img, #al-left script, #al-right script").count() == 0
    assert page.inner_text("#al-prompt-text").strip() == "Say hello <b>politely</b>."
    shot(page, tmp_path, "03_label_xss_pair")

    page.click("#btn-a")  # button
    wait_done(page, 1)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    page.wait_for_selector("#al-prompt", state="visible")  # the multi-turn pair shows as a chat
    assert "Another, and show" in page.inner_text("#al-prompt")
    shot(page, tmp_path, "04_chat_pair")
    # time from key press to the next pair on screen
    page.evaluate("""() => { window.__lat = []; window.__k = null;
        const card = document.querySelector('#al-left [data-testid="markdown"]');
        document.addEventListener('keydown', () => { window.__k = performance.now(); window.__txt = card.innerText; },
                                  true);
        new MutationObserver(() => { if (window.__k !== null && card.innerText !== window.__txt) {
            window.__lat.push(performance.now() - window.__k); window.__k = null; } })
            .observe(card, {childList: true, subtree: true, characterData: true}); }""")
    page.keyboard.press("2")  # B better
    wait_done(page, 2)
    page.keyboard.press("t")  # tie
    wait_done(page, 3)
    page.keyboard.press("u")  # undo the tie: the same pair comes back
    wait_done(page, 2)
    assert "Undid your last label (Tie)" in page.inner_text("#al-status")
    page.keyboard.press("5")  # skip it instead
    wait_done(page, 3)
    # typing in the rationale box must not trigger shortcuts
    page.click("#al-rationale textarea")
    page.keyboard.type("1 2 3 a b tie u")
    assert done_count(page) == 3
    page.locator("#al-confidence label").filter(has_text="high").click()
    shot(page, tmp_path, "05_rationale")
    page.keyboard.press("Escape")
    page.keyboard.press("4")  # both bad, with the rationale
    wait_done(page, 4)
    assert page.input_value("#al-rationale textarea") == ""
    page.keyboard.press("1")
    wait_done(page, 5)
    shot(page, tmp_path, "06_after_labels")
    lat = page.evaluate("window.__lat")
    print("key -> next pair (ms):", [round(x) for x in lat])
    assert len(lat) >= 4 and statistics.median(lat) < 500, lat  # ~100 ms here; the server part is ~20 ms

    labels = store.labels(annotator="alice")
    assert [lab.comparison_id for lab in labels] == [1, 2, 3, 4, 5]
    shown = [("A" if lab.choice == lab.left else "B") if lab.choice in ("a", "b") else lab.choice for lab in labels]
    assert shown == ["A", "B", "skip", "both_bad", "A"]
    assert labels[3].rationale == "1 2 3 a b tie u" and labels[3].confidence == 1.0
    assert len({lab.request_id for lab in labels}) == 5 and all(lab.left in ("a", "b") for lab in labels)

    while done_count(page) < N_PAIRS + 2:  # finish the queue: the empty state says so
        n = done_count(page)
        page.keyboard.press("1")
        wait_done(page, n + 1)
    page.wait_for_selector("#al-refresh", state="visible")
    assert "nothing left to label" in page.inner_text("body").lower()
    shot(page, tmp_path, "07_queue_empty")
    ctx.close()


def test_two_annotators_label_concurrently(browser, app, tmp_path):
    store, address = app
    pages = []
    for name in ("carol", "dave"):
        ctx, page = open_page(browser, address)
        log_in(page, name, f"pw-{name}")
        pages.append((ctx, page))
    total = N_PAIRS + 2
    for i in range(total):  # interleaved: both submit before either waits
        for _, page in pages:
            page.keyboard.press("1" if i % 2 else "2")
        for _, page in pages:
            wait_done(page, i + 1)
    for name in ("carol", "dave"):
        labels = store.labels(annotator=name)
        assert sorted(lab.comparison_id for lab in labels) == list(range(1, total + 1))
    shot(pages[0][1], tmp_path, "08_second_annotator_done")
    for ctx, _ in pages:
        ctx.close()


def test_admin_dashboard_and_double_click(browser, app, tmp_path):
    store, address = app
    ctx, page = open_page(browser, address)
    log_in(page, "root", "pw-root")
    before = len(store.labels(annotator="root"))
    page.dblclick("#btn-b")  # a double click stores one label
    wait_done(page, before + 1)
    page.wait_for_timeout(300)
    assert len(store.labels(annotator="root")) == before + 1
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Dashboard").click()
    page.wait_for_function("() => document.body.innerText.includes('labellers')", timeout=15_000)
    page.wait_for_timeout(800)
    shot(page, tmp_path, "09_admin_dashboard")
    page.get_by_role("tab", name="Prompts → pairs").click()
    page.fill("#al-prompts textarea", "What is 2 + 2?")
    page.click("#al-generate")  # no model given: a clear message, nothing breaks
    page.wait_for_function("() => document.body.innerText.includes('Give a model directory')", timeout=10_000)
    shot(page, tmp_path, "10_admin_generate_error")
    ctx.close()


def test_admin_runs_the_loop_on_what_annotators_label(browser, tmp_path, tiny_loop_config):
    """Admin → Loop → Run (keep running) queues the policy's pairs; an annotator labels them; round 1 trains."""
    from align.data.world import World

    url = f"sqlite:///{tmp_path / 'loop-app.db'}"
    seed_store(url, n_pairs=0, xss=False, chat=False)  # accounts only: the loop's pairs are the queue
    Store(url).import_pairs(World(0).preference_pairs()[:40], source="world", labeller="world-rule")
    with serve(url, loop_config=str(tiny_loop_config(rounds=1, prompts_per_round=4))) as (demo, address):
        ctx, admin = open_page(browser, address)
        log_in(admin, "root", "pw-root", expect_ok=False)  # nothing to label yet
        admin.get_by_role("tab", name="Admin").click()
        admin.get_by_role("tab", name="Loop").click()
        admin.wait_for_function("() => document.body.innerText.includes('0 of 1')", timeout=15_000)
        admin.check("#al-loop-wait input")
        admin.click("#al-loop-run")
        admin.wait_for_function("() => document.body.innerText.includes('still need a label; the loop trains')",
                                timeout=180_000)
        shot(admin, tmp_path, "11_admin_loop_waiting")

        actx, annotator = open_page(browser, address)
        log_in(annotator, "alice", "pw-alice")
        n = 0
        while annotator.locator("#btn-a").is_visible():
            annotator.click("#btn-a")
            n += 1
            wait_done(annotator, n)
        assert n >= 2 and len(Store(url).labels(annotator="alice")) == n
        actx.close()

        # the waiting run sees the labels and trains; the tab refreshes itself while it runs
        admin.wait_for_function("() => document.body.innerText.includes('All rounds are done')", timeout=300_000)
        admin.wait_for_selector("#al-loop-plot img", timeout=15_000)
        assert "1 of 1" in admin.inner_text("#al-loop-status")
        headers = admin.inner_text("#al-loop-table thead")  # the world's columns (a world loop) and the RM's
        assert "EM sampled" in headers and "RM accuracy" in headers and "gold" not in headers
        shot(admin, tmp_path, "12_admin_loop_trained")
        ctx.close()
