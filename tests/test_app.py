"""The labelling app: helpers, the backend's label path and queue, and the named API via gradio_client."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align.config import ConfigError, parse  # noqa: E402
from app.backend import AppError, Backend, Session, Store, parse_prompts  # noqa: E402
from app.main import CONFIG_TYPES, AppArguments, create_accounts  # noqa: E402
from app.render import chat_messages, response_markdown, safe_markdown  # noqa: E402
from app.testing import XSS, seed_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/prefs.db"
    seed_store(url)
    return url


def login(backend: Backend, name: str) -> Session:
    pw = {"alice": "pw-alice", "bob": "pw-bob", "root": "pw-root"}[name]
    return backend.login(Session(), name, pw)


# ------------------------------------------------------------------------------------ rendering
def test_safe_markdown_escapes_html_outside_code():
    out = safe_markdown(XSS)
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;" in out and "&lt;img src=x onerror=\"window.__pwned=1\"&gt;" in out
    assert safe_markdown("a & b") == "a &amp; b"
    assert safe_markdown("**bold** and `x<y`") == "**bold** and `x<y`"  # code spans stay literal
    fenced = "before <b>\n```html\n<img src=x>\n```\nafter <i>"
    assert safe_markdown(fenced) == "before &lt;b&gt;\n```html\n<img src=x>\n```\nafter &lt;i&gt;"
    assert safe_markdown("```\n<b>open") == "```\n<b>open\n```\n"  # unterminated fence is closed
    assert safe_markdown(None) == ""


def test_chat_and_response_rendering():
    msgs = [{"role": "system", "content": "Be <b>brief</b>."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    chat = chat_messages(msgs)
    assert [m["role"] for m in chat] == ["user", "user", "assistant", "user"]
    assert chat[0]["content"] == "**System:** Be &lt;b&gt;brief&lt;/b&gt;."
    assert response_markdown("") == "*(empty response)*"
    two = response_markdown(None, [{"role": "assistant", "content": "a"}, {"role": "user", "content": "<x>"}])
    assert "**Assistant:**" in two and "&lt;x&gt;" in two


# ------------------------------------------------------------------------------------ config
def test_config_file_parses_and_validates(tmp_path):
    (args,) = parse(CONFIG_TYPES, [str(ROOT / "configs/app.yaml"), "--port", "7999", "--overlap", "2"])
    assert isinstance(args, AppArguments) and args.port == 7999 and args.overlap == 2
    assert args.db == "sqlite:///data/preferences.db" and Path(ROOT / args.guidelines).exists()
    with pytest.raises(ConfigError, match="unknown key 'overlapp'.*did you mean 'overlap'"):
        parse(CONFIG_TYPES, ["--overlapp", "2"])
    with pytest.raises(ConfigError, match="overlap must be >= 1"):
        parse(CONFIG_TYPES, ["--overlap", "0"])
    with pytest.raises(ConfigError, match="create_admin must be NAME:PASSWORD"):
        parse(CONFIG_TYPES, ["--create_admin", "nopassword"])
    bad = tmp_path / "app.yaml"
    bad.write_text("port: 1\nmodels: 3\n")
    with pytest.raises(ConfigError, match=r"app.yaml:2: key 'models'"):
        parse(CONFIG_TYPES, [str(bad)])


def test_create_accounts_creates_and_updates(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    args = AppArguments(db=url, create_admin="ada:s3cret", create_annotator="ann:pw1")
    assert create_accounts(args) == ["created admin 'ada'", "created annotator 'ann'"]
    store = Store(url)
    assert store.verify_annotator("ada", "s3cret").role == "admin"
    args = AppArguments(db=url, create_admin="ada:new-pw")
    assert create_accounts(args) == ["updated admin 'ada' (new password)"]
    assert store.verify_annotator("ada", "s3cret") is None and store.verify_annotator("ada", "new-pw")


def test_parse_prompts_lines_and_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "one"}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "two"},
                                            {"role": "assistant", "content": "reply"}]}) + "\n"
                 + json.dumps({"instruction": "three", "input": "ctx"}) + "\n")
    got = parse_prompts(" a \n\n b\n", str(f))
    assert got == ["a", "b", "one", [{"role": "user", "content": "two"}], "three\n\nctx"]
    f.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(AppError, match=r"p.jsonl:2"):
        parse_prompts("", str(f))
    f.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(AppError, match=r"p.jsonl:1: no prompt field"):
        parse_prompts("", str(f))


def test_parse_prompts_of_preference_files_and_the_first_n(tmp_path):
    """An HH record (chosen/rejected transcripts only) gives the prompt both replies answer; ``limit`` takes the
    file's first records (a 300-record file need not mean 600 candidates)."""
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps({"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: yes",
                                     "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: no"}) + "\n" for i in range(5)))
    got = parse_prompts("pasted", str(f), limit=2)
    assert got == ["pasted", [{"role": "user", "content": "Q0?"}], [{"role": "user", "content": "Q1?"}]]
    assert len(parse_prompts("", str(f))) == 5
    with pytest.raises(AppError, match=">= 0"):
        parse_prompts("", str(f), limit=-1)


# ------------------------------------------------------------------------------------ backend
def test_login_and_roles(db):
    b = Backend(Store(db))
    assert login(b, "root").is_admin and not login(b, "alice").is_admin
    with pytest.raises(AppError, match="Wrong name or password"):
        b.login(Session(), "alice", "nope")
    with pytest.raises(AppError, match="Wrong name or password"):
        b.login(Session(), "mallory", "x")
    with pytest.raises(AppError, match="Only admins"):
        b.add_prompts(login(b, "alice"), "a prompt", None)
    with pytest.raises(AppError, match="log in"):
        b.next_view(Session())


def test_submit_maps_displayed_side_and_is_idempotent(db):
    store = Store(db)
    b = Backend(store)
    s = login(b, "alice")
    v = b.next_view(s)
    assert v.comparison_id == 1 and v.remaining == 8 and v.done == 0
    left = s.shown.left
    v2, msg = b.submit(s, "A", v.request_id, "  clearer ", 1.0)
    assert msg == "Saved: A is better" and v2.comparison_id == 2 and v2.done == 1
    assert b.submit(s, "A", v.request_id) == (None, "")  # double click: ignored
    assert b.submit(s, "B", "forged-id") == (None, "")
    (lab,) = store.labels(annotator="alice")
    assert (lab.comparison_id, lab.choice, lab.left, lab.rationale, lab.confidence) == (1, left, left, "clearer", 1.0)
    assert lab.request_id == v.request_id and lab.seconds is not None and lab.seconds >= 0
    b.submit(s, "B", v2.request_id)  # B = the response shown on the right
    lab2 = store.labels(annotator="alice")[-1]
    assert lab2.choice == ("b" if lab2.left == "a" else "a")


def test_undo_shows_the_same_pair_same_sides(db):
    store = Store(db)
    b = Backend(store)
    s = login(b, "alice")
    v = b.next_view(s)
    left = s.shown.left
    b.submit(s, "tie", v.request_id)
    view, msg = b.undo(s)
    assert msg == "Undid your last label (Tie)"
    assert view.comparison_id == v.comparison_id and s.shown.left == left and view.left_text == v.left_text
    assert store.labels(annotator="alice") == [] and view.done == 0
    assert b.undo(s)[1] == "Nothing to undo"
    b.submit(s, "skip", view.request_id)
    assert [lab.choice for lab in store.labels(annotator="alice")] == ["skip"]


def test_queue_overlap_no_repeats_and_empty(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    seed_store(url, n_pairs=2, xss=False, chat=False)
    store = Store(url)
    b = Backend(store, overlap=2)
    seen = {"alice": [], "bob": [], "root": []}
    for name in seen:
        s = login(b, name)
        v = b.next_view(s)
        while not v.empty:
            seen[name].append(v.comparison_id)
            v, _ = b.submit(s, "A", v.request_id)
        assert v.remaining == 0
    assert seen["alice"] == seen["bob"] == [1, 2]  # priority order, each once
    assert seen["root"] == []  # two distinct annotators per pair already
    assert len(store.labels()) == 4


def test_racing_for_the_last_item_keeps_both_labels(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    seed_store(url, n_pairs=1, xss=False, chat=False)
    store = Store(url)
    b = Backend(store, overlap=1)
    sa_, sb = login(b, "alice"), login(b, "bob")
    va, vb = b.next_view(sa_), b.next_view(sb)
    assert va.comparison_id == vb.comparison_id == 1
    results = []
    threads = [threading.Thread(target=lambda s, v: results.append(b.submit(s, "B", v.request_id)), args=a)
               for a in ((sa_, va), (sb, vb))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(lab.annotator for lab in store.labels(comparison_id=1)) == ["alice", "bob"]
    assert all(v.empty for v, _ in results)


def test_label_path_is_fast(db):
    b = Backend(Store(db))
    s = login(b, "alice")
    v = b.next_view(s)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        v, _ = b.submit(s, "A", v.request_id)
        times.append(time.perf_counter() - t)
    assert sorted(times)[2] < 0.2, times  # median submit + next pair


def test_store_unreachable_is_a_clear_error(tmp_path):
    b = Backend(Store(f"sqlite:///{tmp_path}/nodir/../missing/x.db"))
    (tmp_path / "missing").mkdir(exist_ok=True)
    (tmp_path / "missing" / "x.db").write_text("this is not a database")
    with pytest.raises(AppError, match="not reachable"):
        b.login(Session(), "alice", "pw")


def test_unreachable_postgres_is_a_clear_error():
    b = Backend(Store("postgresql+psycopg://u:p@127.0.0.1:1/nodb"))
    with pytest.raises(AppError, match="not reachable.*Nothing was lost"):
        b.login(Session(), "alice", "pw")


def test_cli_creates_accounts_without_serving(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/cli.db"
    out = subprocess.run([sys.executable, "-m", "app", str(ROOT / "configs/app.yaml"), "--db", url,
                          "--create_admin", "ada:pw-ada", "--serve", "false"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"created admin 'ada' in {url}" in out.stdout
    assert Store(url).verify_annotator("ada", "pw-ada").role == "admin"
    bad = subprocess.run([sys.executable, "-m", "app", "--prot", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "unknown key 'prot' (did you mean 'port'?)" in bad.stderr


def test_fastapi_mount_and_healthz(db):
    from fastapi.testclient import TestClient

    from app.ui import create_fastapi_app  # (`from app import ...` too, once `pip install -e .` is rerun)

    api = create_fastapi_app(AppArguments(db=db))
    with TestClient(api) as client:
        assert client.get("/healthz").json()["ok"] is True
        page = client.get("/")
        assert page.status_code == 200 and "align · A/B labelling" in page.text


def test_admin_errors_and_import(db, tmp_path):
    store = Store(db)
    b = Backend(store)
    root = login(b, "root")
    with pytest.raises(AppError, match="Model directory not found: /no/such/model"):
        b.generate_pairs(root, [1], "/no/such/model")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(AppError, match="not a model directory"):
        b.generate_pairs(root, [1], str(tmp_path / "notamodel"))
    before = store.stats()["counts"]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n{oops\n")
    with pytest.raises(AppError, match=r"Nothing imported — pairs.jsonl:2"):
        b.import_pairs(root, str(bad), queue=True)
    assert store.stats()["counts"] == before
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    msg = b.import_pairs(root, str(bad), queue=True, priority=500)
    assert "1 pairs" in msg and "1 comparisons" in msg
    s = login(b, "alice")
    assert b.next_view(s).prompt == [{"role": "user", "content": "p"}]  # queued first
    path, msg = b.export(root, tmp_path / "exp", kinds=None)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows and rows[0]["chosen"][0]["content"] == "c" and "Exported **1** pairs" in msg


def test_dashboard_plots(db):
    from app import dashboard as D

    store = Store(db)
    b = Backend(store, overlap=2)
    for name in ("alice", "bob"):
        s = login(b, name)
        v = b.next_view(s)
        for choice in ("A", "B", "tie", "A"):
            v, _ = b.submit(s, choice, v.request_id)
    labels = store.labels()
    first = store.labels(annotator="alice")[0]  # decisive ("A"), its side known: re-asked with the sides swapped
    store.submit_reask(first.id, "a", left="b" if first.left == "a" else "a")
    quality = store.annotator_quality()
    for fig in (D.labels_over_time(labels), D.label_distribution(labels), D.position_bias(quality),
                D.seconds_per_label(labels), D.labels_over_time([])):
        assert fig.axes
    ax = D.position_bias(quality).axes[0]
    bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    assert bars == {q["name"]: q["left_share"] for q in quality if q["left_share"] is not None}  # the table's
    assert [t.get_text().split(" of ")[1] for t in ax.texts] == ["4", "3"]  # alice's re-ask counts, as in the table
    rows = D.agreement_table(store.stats(), labels)
    assert rows and rows[0][:3] == ["alice", "bob", 4]
    assert D.agreement_rows(labels)[0][:3] == ["alice", "bob", 4]
    assert "8** labels" in D.summary_markdown(store.stats(), labels)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random decoder + a small byte-level BPE tokenizer, saved like a run's final/."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from align.data.chat import SPECIAL_TOKENS
    from align.model import DecoderConfig, DecoderForCausalLM
    from align.tokenizer import build_tokenizer_object, wrap

    tok_obj: Tokenizer = build_tokenizer_object()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok_obj.train_from_iterator(["What is 1 + 2? The answer is 3."] * 4, trainer=trainer)
    tok = wrap(tok_obj)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("run") / "final"
    DecoderForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    assert isinstance(models.BPE, type)
    return str(out)


def test_generate_pairs_with_a_tiny_model(db, tiny_model_dir):
    store = Store(db)
    b = Backend(store)
    root = login(b, "root")
    ids = b.add_prompts(root, "What is 7 + 1?\nName a fruit.", None)
    res = b.generate_pairs(root, ids, tiny_model_dir, None, temperature=1.0, top_p=1.0, max_new_tokens=6,
                           priority=1000, seed=0)
    assert res["prompts"] == 2 and res["comparisons"] + res["identical"] == 2 and res["comparisons"] >= 1
    assert res["candidates"] == 4 and res["seconds_per_candidate"] == pytest.approx(res["seconds"] / 4, abs=0.02)
    comp = store.next_comparison("alice")
    assert comp.prompt_id in ids and comp.model_a == comp.model_b == tiny_model_dir
    two = b.generate_pairs(root, ids[:1], tiny_model_dir, tiny_model_dir + "/", temperature=0.0,
                           max_new_tokens=4, priority=1000)
    assert two["prompts"] == 1  # two "models" (same weights, different ids): greedy answers may match


# ------------------------------------------------------------------------------------ API (gradio_client)
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from app.testing import serve

    url = f"sqlite:///{tmp_path_factory.mktemp('api')}/api.db"
    seed_store(url)
    with serve(url, overlap=2) as (demo, address):
        yield url, address


def _client(address):
    from gradio_client import Client

    return Client(address, verbose=False)


def _info(result) -> dict:
    """The screen as data (the hidden JSON output); {} when the request changed nothing."""
    got = [x for x in result if isinstance(x, dict) and ("user" in x or "error" in x)]
    return got[-1] if got else {}


def test_api_login_submit_undo_and_duplicates(served):
    url, address = served
    store = Store(url)
    c = _client(address)
    bad = _info(c.predict("alice", "wrong", api_name="/login"))
    assert "Wrong name or password" in bad["error"]
    info = _info(c.predict("alice", "pw-alice", api_name="/login"))
    assert info["user"] == "alice" and info["comparison_id"] == 1 and XSS in (info["left"], info["right"])
    first = info["request_id"]
    t = time.perf_counter()
    nxt = _info(c.predict("A", first, "why not", 2 / 3, api_name="/submit"))
    assert time.perf_counter() - t < 2.0
    assert nxt["comparison_id"] == 2 and nxt["done"] == 1 and nxt["message"].startswith("✓ Saved: A is better")
    c.predict("A", first, "", None, api_name="/submit")  # the same request again: nothing new
    assert [(lab.comparison_id, lab.rationale) for lab in store.labels(annotator="alice")] == [(1, "why not")]
    nxt = _info(c.predict("skip", nxt["request_id"], "", None, api_name="/submit"))
    back = _info(c.predict(api_name="/undo"))
    assert back["comparison_id"] == 2 and back["message"].startswith("↶ Undid")
    assert _info(c.predict(api_name="/next"))["request_id"] == back["request_id"]  # same pair, same id
    assert len(store.labels(annotator="alice")) == 1


def test_api_two_sessions_are_independent(served):
    url, address = served
    store = Store(url)
    ca, cb = _client(address), _client(address)
    ia = _info(ca.predict("bob", "pw-bob", api_name="/login"))
    ib = _info(cb.predict("root", "pw-root", api_name="/login"))
    assert ia["user"] == "bob" and ib["user"] == "root" and ib["role"] == "admin"
    ra = _info(ca.predict("B", ia["request_id"], "", None, api_name="/submit"))
    # bob's request id is useless in root's session
    rb = _info(cb.predict("B", ia["request_id"], "", None, api_name="/submit"))
    assert rb == {}  # ignored: nothing changes on screen
    assert ra["user"] == "bob" and not store.labels(annotator="root")
    anon = _client(address)  # a session that never logged in
    assert "log in" in _info(anon.predict(api_name="/next"))["error"]
    assert store.labels(annotator="bob")[0].comparison_id == ia["comparison_id"]


def test_api_admin_endpoints_check_role(served, tmp_path):
    url, address = served
    c = _client(address)
    c.predict("alice", "pw-alice", api_name="/login")
    out = c.predict(api_name="/dashboard")
    assert "Only admins" in out[0]
    r = _client(address)
    r.predict("root", "pw-root", api_name="/login")
    out = r.predict(api_name="/dashboard")
    assert "labels" in out[0]
    f, msg = r.predict("conversational", False, 1, api_name="/export")
    assert "Exported" in msg and Path(f).exists()
    msg = r.predict("carol", "pw-carol", "annotator", api_name="/add_account")[0]
    assert "Added annotator **carol**" in msg and Store(url).verify_annotator("carol", "pw-carol")
    msg = r.predict("What is 1 + 1?", None, "/no/such/dir", "", 0.8, 0.95, 8, 0, api_name="/generate")[0]
    assert "Model directory not found" in msg
