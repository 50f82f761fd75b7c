"""The labelling app with a real model, in Chromium: SmolLM2-135M-Instruct generates the candidates, an annotator
labels them, and a loop round trains a reward model and a DPO step on exactly those labels.

As a test (``pytest -m browser tests/test_app_smollm2.py``): 2 prompts, 16-token replies, one-step stages; about
2-3 minutes on 2 CPU cores. Skipped without Chromium or SmolLM2 (``models/smollm2-135m-instruct``, or the
``real`` extra's GGUF, converted once).

As a script, against a running app (the walkthrough of docs/real-models.md, "The app with the real model"):

    python -m app configs/smollm2/app.yaml --create_admin admin:PW --create_annotator ann:PW --serve false
    python -m app configs/smollm2/app.yaml --loop_config configs/smollm2/loop_cpu.yaml --port 7861 &
    python tests/test_app_smollm2.py --url http://127.0.0.1:7861 --admin admin:PW --annotator ann:PW --prompts 20

Screenshots go to ``--shots`` (default /tmp/app_screens_smollm2); the figures are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_browser_app import done_count, log_in, open_page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT.parent / "shared" / "data" / "preference"
PROMPTS_FILE = PREFS / "dpo_en_demo.json"  # long, open questions: multi-paragraph replies, lists, code
SCREENS = Path("/tmp/app_screens_smollm2")


def shot(page, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def generate_in_app(page, prompts_file: Path, n_prompts: int, max_new_tokens: int, shots: Path) -> dict:
    """Admin → Prompts → pairs: the file's first ``n_prompts`` prompts, two SmolLM2 samples each."""
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Prompts → pairs").click()
    page.set_input_files("#al-prompts-file input[type=file]", str(prompts_file))
    page.wait_for_function(f"() => document.querySelector('#al-prompts-file').innerText.includes("
                           f"{json.dumps(prompts_file.name)})", timeout=20_000)
    page.fill("#al-prompts-limit input", str(n_prompts))
    page.fill("#al-max-new input", str(max_new_tokens))
    page.click("#al-generate")
    page.wait_for_timeout(4000)
    shot(page, shots, "30_admin_generating")
    page.wait_for_function("() => /new pairs|⚠️/.test(document.querySelector('#al-gen-msg').innerText)",
                           timeout=(120 + 60 * n_prompts * max_new_tokens // 32) * 1000)
    msg = page.inner_text("#al-gen-msg")
    shot(page, shots, "31_admin_generated")
    m = re.search(r"(\d+) prompts → (\d+) new pairs.* (\d+) candidates in ([\d.]+) s \(([\d.]+) s each\)", msg)
    assert m, msg
    return {"prompts": int(m[1]), "pairs": int(m[2]), "candidates": int(m[3]), "seconds": float(m[4]),
            "seconds_per_candidate": float(m[5])}


def repetition(text: str) -> float:
    """Share of a reply's sentences that repeat an earlier one (SmolLM2's failure mode at T=0.8)."""
    sentences = [s.strip().lower() for s in re.split(r"[.!?\n]+", text) if s.strip()]
    return 1 - len(set(sentences)) / len(sentences) if sentences else 1.0


def choose(left: str, right: str) -> str:
    """A stand-in annotator: both repetitive → both bad; else the reply with fewer repeated sentences, then the one
    that ends its last sentence (not cut at max_new_tokens), then the longer; never a side by its position."""
    rl, rr = repetition(left), repetition(right)
    if min(rl, rr) > 0.3:
        return "both_bad"

    def key(text: str, rep: float) -> tuple:
        return -round(rep, 2), text.rstrip().endswith((".", "!", "?", "`")), len(text)
    return "A" if key(left, rl) >= key(right, rr) else "B"


KEYS = {"A": "1", "B": "2", "tie": "3", "both_bad": "4"}
BUTTONS = {"A": "#btn-a", "B": "#btn-b", "tie": "#btn-tie", "both_bad": "#btn-bad"}


def label_queue(page, shots: Path, prefix: str) -> list[str]:
    """Label every pair in the annotator's queue, by keys and clicks in turn; screenshots of the first pair and of
    the one with the longest replies. Returns the choices."""
    choices, longest = [], 0
    page.wait_for_timeout(1000)  # the screen after sign-in / Check again has settled (no greyed pending cards)
    while page.locator("#btn-a").is_visible():
        left, right = page.inner_text("#al-left"), page.inner_text("#al-right")
        if not choices:
            shot(page, shots, f"{prefix}_first_pair")
        if len(left) + len(right) > longest and choices:
            longest = len(left) + len(right)
            shot(page, shots, f"{prefix}_longest_pair")
        c = choose(left, right)
        before = page.evaluate("() => document.querySelector('#al-left').innerText + '|' + "
                               "document.querySelector('.al-progress-text').innerText")
        if len(choices) % 2:
            page.click(BUTTONS[c])
        else:
            page.keyboard.press(KEYS[c])
        # the next pair (or a re-ask of an earlier one, which leaves the count as it is) or the empty queue
        page.wait_for_function("(b) => !document.querySelector('#btn-a').checkVisibility() || "
                               "document.querySelector('#al-left').innerText + '|' + "
                               "document.querySelector('.al-progress-text').innerText !== b", arg=before,
                               timeout=15_000)
        page.wait_for_timeout(300)
        choices.append(c)
    return choices


def run_loop_round(page, shots: Path, timeout_s: float) -> str:
    """Admin → Loop → Run: round 1 trains on the labels; round 2's pairs are queued. Returns the tab's status."""
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Loop").click()
    page.wait_for_function("() => document.querySelector('#al-loop-status').innerText.includes('rounds trained')",
                           timeout=20_000)
    page.click("#al-loop-run")
    page.wait_for_function("() => document.querySelector('#al-loop-status').innerText.includes('Running')",
                           timeout=20_000)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the tab refreshes itself every 3 s while the run goes
        status = page.inner_text("#al-loop-status")
        if "Running" not in status:
            break
        page.wait_for_timeout(3000)
    page.wait_for_timeout(3500)  # the last refresh: plot and table
    shot(page, shots, "33_admin_loop_round_1")
    status = page.inner_text("#al-loop-status")
    assert "1 of 2" in status and "Round 2" in status, (status, page.input_value("#al-loop-log textarea"))
    return status


def walkthrough(browser, url: str, admin: tuple[str, str], annotator: tuple[str, str], prompts_file: Path,
                n_prompts: int, max_new_tokens: int, shots: Path, loop_timeout_s: float = 3600) -> dict:
    """The admin generates, the annotator labels, the admin runs a loop round, the annotator gets round 2's pairs."""
    figures: dict = {}
    actx, adm = open_page(browser, url)
    log_in(adm, *admin, expect_ok=False)
    adm.wait_for_selector("#al-logout", state="visible", timeout=10_000)
    figures["generate"] = generate_in_app(adm, prompts_file, n_prompts, max_new_tokens, shots)

    lctx, ann = open_page(browser, url)
    log_in(ann, *annotator)
    t0 = time.monotonic()
    round1 = label_queue(ann, shots, "32_label")
    figures["label"] = {"labels": len(round1), "seconds": round(time.monotonic() - t0, 1),
                        "choices": {c: round1.count(c) for c in sorted(set(round1))}}
    shot(ann, shots, "32_label_queue_empty")

    t0 = time.monotonic()
    figures["loop_status"] = run_loop_round(adm, shots, loop_timeout_s)
    figures["loop_seconds"] = round(time.monotonic() - t0, 1)

    ann.click("#al-refresh")  # round 2's candidates are in the annotator's queue
    ann.wait_for_selector("#btn-a", state="visible", timeout=15_000)
    shot(ann, shots, "34_label_round_2")
    figures["round_2_queue"] = int(re.search(r"(\d+)\s+left in queue", ann.inner_text(".al-progress-text"))[1])
    figures["labels_total"] = done_count(ann)
    round2 = label_queue(ann, shots, "35_label_round_2")
    figures["round_2_labels"] = len(round2)
    actx.close()
    lctx.close()
    return figures


# ----------------------------------------------------------------------------------------------- the test
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not PREFS.exists(), reason="../shared/data not present")
def test_smollm2_generate_label_and_train_in_the_app(browser, smollm2_dir, tmp_path):
    import yaml
    from test_real_model import run_plain

    from app.backend import Store
    from app.testing import serve

    url = f"sqlite:///{tmp_path / 'smollm2.db'}"
    store = Store(url).init()
    store.add_annotator("root", "pw-root", "admin")
    store.add_annotator("alice", "pw-alice", "annotator")
    loop = yaml.safe_load((ROOT / "configs/smollm2/loop_cpu.yaml").read_text()) | {
        "output_dir": str(tmp_path / "loop"), "store_url": url, "policy_path": str(smollm2_dir),
        "reward_base_path": str(smollm2_dir), "configs_dir": str(ROOT / "configs/smollm2"),
        "dataset_name": str(PREFS / "hh-helpful-base-test.jsonl.gz"), "prompts_per_round": 2, "max_new_tokens": 8,
        "stage_args": {"reward": {"max_length": 128, "max_steps": 1, "per_device_train_batch_size": 2,
                                  "test_size": 0.0},
                       "dpo": {"max_length": 128, "per_device_train_batch_size": 2, "test_fraction": 0.0,
                               "win_rate_num_prompts": 0}}}
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump(loop))
    shots = SCREENS / "test"
    with serve(url, models=[str(smollm2_dir)], loop_config=str(tmp_path / "loop.yaml"), gold_rate=0.0,
               reask_rate=0.0) as (demo, address):
        figures = walkthrough(browser, address, ("root", "pw-root"), ("alice", "pw-alice"), PROMPTS_FILE, 2, 16,
                              shots, loop_timeout_s=400)
    print(json.dumps(figures, indent=1))
    assert figures["generate"]["prompts"] == 2 and figures["label"]["labels"] == figures["generate"]["pairs"] >= 1
    assert figures["round_2_queue"] >= 1 and figures["round_2_labels"] == figures["round_2_queue"]

    # round 1 trained on exactly the app's labelled pairs; its final/ dirs load in plain transformers
    round1 = tmp_path / "loop" / "round_1"
    queued = json.loads((round1 / "comparisons.json").read_text())
    app_pairs = {lab.comparison_id for lab in store.labels(annotator="alice")
                 if store.get_comparison(lab.comparison_id).source == "app:generate"}
    assert {q["comparison_id"] for q in queued} == app_pairs
    report = json.loads((tmp_path / "loop" / "report.json").read_text())
    decisive = len((round1 / "pairs.jsonl").read_text().splitlines())
    assert report["rounds"]["1"]["pairs"] == decisive >= 1 and report["waiting"]["round"] == 2
    got = run_plain(f"""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        rm = AutoModelForSequenceClassification.from_pretrained({str(round1 / 'reward/final')!r})
        policy = AutoModelForCausalLM.from_pretrained({str(round1 / 'dpo/final')!r})
        print(json.dumps({{"rm": type(rm).__name__, "policy": type(policy).__name__,
                          "align_imported": any(m == "align" or m.startswith("align.") for m in sys.modules)}}))
    """, tmp_path)
    assert got == {"rm": "LlamaForSequenceClassification", "policy": "LlamaForCausalLM"}


# --------------------------------------------------------------------------------------------- the script
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7861")
    p.add_argument("--admin", required=True, help="NAME:PASSWORD")
    p.add_argument("--annotator", required=True, help="NAME:PASSWORD")
    p.add_argument("--prompts_file", default=str(PROMPTS_FILE))
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--shots", default=str(SCREENS))
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from app.testing import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        figures = walkthrough(browser, a.url, tuple(a.admin.split(":", 1)), tuple(a.annotator.split(":", 1)),
                              Path(a.prompts_file), a.prompts, a.max_new_tokens, Path(a.shots))
        browser.close()
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
