"""The preference store: API, queue, labels, import/export, stats, CLI (SQLite and PostgreSQL)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest_store import *  # noqa: F403  (fixtures store, store_url)

from align.store import DataError, LabelExists, NotFound, RequestIdConflict, Store, StoreError
from align.store import schema as S

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "preference"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def _queue(store, n=3, priority=None):
    """n comparisons with priorities; returns their ids."""
    ids = []
    for i in range(n):
        pid = store.add_prompt(f"prompt {i}", source="test", tags=["t"])
        ra = store.add_response(pid, f"answer A{i}", model="m1", settings={"temperature": 0.7})
        rb = store.add_response(pid, f"answer B{i}", model="m2")
        ids.append(store.add_comparison(pid, ra, rb, priority=(priority or [0.0] * n)[i]))
    return ids


def test_sqlite_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGN_STORE_URL", raising=False)
    s = Store().init()
    assert (tmp_path / "data" / "preferences.db").exists()
    with s.engine.connect() as c:
        assert c.exec_driver_sql("pragma journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("pragma foreign_keys").scalar() == 1
        assert c.exec_driver_sql("pragma busy_timeout").scalar() == 30000
    assert s.schema_version() == S.LATEST == 3
    s.init()  # idempotent
    assert s.schema_version() == S.LATEST == 3
    s.close()


def test_entities_dedup(store):
    p1 = store.add_prompt("Hello?", source="s", tags=["x"])
    assert store.add_prompt("Hello?") == p1
    assert store.add_prompt([u("Hello?")]) == p1  # text prompt == one user message
    assert store.get_prompt(p1)["messages"] == [u("Hello?")]
    p2 = store.add_prompt([{"role": "system", "content": "Be nice"}, u("Hello?")])
    assert p2 != p1
    r1 = store.add_response(p1, "Hi", model="m", settings={"t": 1.0})
    assert store.add_response(p1, "Hi", model="m") == r1
    r2 = store.add_response(p1, "Hi", model="other")
    assert r2 != r1
    c = store.add_comparison(p1, r1, r2, priority=2.0)
    assert store.add_comparison(p1, r2, r1) == c  # either order
    comp = store.get_comparison(c)
    assert comp.prompt == [u("Hello?")] and comp.text_a == "Hi" and comp.model_b == "other"
    with pytest.raises(ValueError, match="two different"):
        store.add_comparison(p1, r1, r1)
    r3 = store.add_response(p2, "x")
    with pytest.raises(ValueError, match="belongs to prompt"):
        store.add_comparison(p1, r1, r3)
    with pytest.raises(NotFound):
        store.add_response(99999, "x")
    with pytest.raises(NotFound):
        store.get_comparison(99999)


def test_labels_idempotent_and_never_overwrite_others(store):
    c1, c2, _ = _queue(store)
    store.add_annotator("ann", "pw1")
    store.add_annotator("bob", "pw2")
    lab = store.submit_label(c1, "ann", "a", left="b", rationale="clearer", confidence=0.8,
                             seconds=12.5, request_id="req-1")
    assert (lab.choice, lab.left, lab.annotator, lab.seconds) == ("a", "b", "ann", 12.5)
    # resubmitting the same request id changes nothing, even with another payload
    again = store.submit_label(c1, "ann", "b", left="a", request_id="req-1")
    assert again.id == lab.id and again.choice == "a"
    assert len(store.labels()) == 1
    # the same request id from someone else / for another comparison is an error
    with pytest.raises(RequestIdConflict):
        store.submit_label(c1, "bob", "b", request_id="req-1")
    with pytest.raises(RequestIdConflict):
        store.submit_label(c2, "ann", "b", request_id="req-1")
    # a second annotator's label never overwrites the first's
    bob = store.submit_label(c1, "bob", "b", request_id="req-2")
    got = {x.annotator: x.choice for x in store.labels(comparison_id=c1)}
    assert got == {"ann": "a", "bob": "b"} and bob.id != lab.id
    # the same annotator relabelling: an error unless replace=True (updates only their own)
    with pytest.raises(LabelExists, match="already labelled"):
        store.submit_label(c1, "ann", "tie")
    store.submit_label(c1, "ann", "tie", replace=True)
    got = {x.annotator: x.choice for x in store.labels(comparison_id=c1)}
    assert got == {"ann": "tie", "bob": "b"}
    with pytest.raises(ValueError, match="choice"):
        store.submit_label(c1, "ann", "A")
    with pytest.raises(ValueError, match="left"):
        store.submit_label(c1, "ann", "a", left="left")
    with pytest.raises(NotFound):
        store.submit_label(99999, "ann", "a")
    with pytest.raises(NotFound):
        store.submit_label(c1, "nobody", "a")


def test_undo_last(store):
    c1, c2, _ = _queue(store)
    store.add_annotator("ann")
    store.submit_label(c1, "ann", "a")
    store.submit_label(c2, "ann", "b")
    undone = store.undo_last("ann")
    assert undone.comparison_id == c2
    assert [x.comparison_id for x in store.labels(annotator="ann")] == [c1]
    store.submit_label(c2, "ann", "a")  # may label it again after undo
    assert store.undo_last("ann").choice == "a"
    assert store.undo_last("ann").comparison_id == c1
    assert store.undo_last("ann") is None


def test_queue_overlap_priority_and_race(store):
    c1, c2, c3 = _queue(store, priority=[1.0, 5.0, 1.0])
    for n in ("x", "y", "z"):
        store.add_annotator(n)
    store.add_annotator("gpt", kind="ai")
    # priority desc, then id
    assert store.next_comparison("x", overlap=2).id == c2
    seen = []
    while (c := store.next_comparison("x", overlap=2)) is not None:
        seen.append(c.id)
        store.submit_label(c.id, "x", "a", left="a")
    assert seen == [c2, c1, c3]  # nobody sees the same pair twice
    assert store.progress("x", overlap=2) == {"done": 3, "remaining": 0, "assigned": 3}
    assert store.progress("y", overlap=2) == {"done": 0, "remaining": 3, "assigned": 3}
    # AI labels and skips don't fill human overlap slots
    store.submit_label(c2, "gpt", "b")
    store.submit_label(c2, "y", "skip")
    assert store.next_comparison("z", overlap=2).id == c2
    # race for the last slot: y and z both get c1; both labels are kept (beyond overlap)
    assert store.next_comparison("y", overlap=2).id == c1
    assert store.next_comparison("z", overlap=2).id == c2
    store.submit_label(c2, "z", "a")  # c2 is now full for overlap 2 (x, z)
    assert store.next_comparison("z", overlap=2).id == c1
    store.submit_label(c1, "y", "a")
    store.submit_label(c1, "z", "b")  # y filled the slot first; z's label is kept anyway
    assert len(store.labels(comparison_id=c1)) == 3
    assert store.next_comparison("y", overlap=2).id == c3
    # imported pairs are not queued
    store.add_pair("p", "c", "r")
    assert store.progress("y", overlap=1)["remaining"] == 0


def test_annotators_passwords(store):
    admin = store.add_annotator("root", "s3cret", role="admin")
    assert admin.role == "admin" and admin.kind == "human"
    assert store.verify_annotator("root", "s3cret").name == "root"
    assert store.verify_annotator("root", "wrong") is None
    assert store.verify_annotator("nobody", "s3cret") is None
    store.set_password("root", "new")
    assert store.verify_annotator("root", "s3cret") is None
    assert store.verify_annotator("root", "new") is not None
    store.set_role("root", "annotator")
    assert store.get_annotator("root").role == "annotator"
    with pytest.raises(StoreError, match="already exists"):
        store.add_annotator("root", "x")
    with pytest.raises(ValueError):
        store.add_annotator("z", role="god")
    with pytest.raises(NotFound):
        store.set_role("nobody", "admin")
    with store.engine.connect() as c:  # salted: equal passwords, different hashes
        store.add_annotator("a1", "same")
        store.add_annotator("a2", "same")
        h = c.execute(sa.text("select password_hash from annotators where name in ('a1','a2')")
                      ).scalars().all()
        assert len(set(h)) == 2 and all(x.startswith("scrypt$") for x in h)
    names = [x["name"] for x in store.list_annotators()]
    assert names == ["root", "a1", "a2"]


def test_add_pair_and_export_policies(store):
    cid = store.add_pair("Q1", "good", "bad", labeller="rules", source="unit")
    lab = store.labels(comparison_id=cid)
    assert len(lab) == 1 and lab[0].annotator == "rules"
    assert store.get_annotator("rules").kind == "rule"
    comp = store.get_comparison(cid)
    # label direction follows A/B, not the chosen side
    assert (comp.text_a == "good") == (lab[0].choice == "a")
    rows = store.export_rows()[0]["train"]
    assert rows == [{"prompt": [u("Q1")], "chosen": [a("good")], "rejected": [a("bad")]}]
    # majority vote, min_agreement, min_labels, ties dropped
    c1, c2, c3 = _queue(store)
    for n in ("h1", "h2", "h3"):
        store.add_annotator(n)
    for n, ch in (("h1", "a"), ("h2", "a"), ("h3", "b")):
        store.submit_label(c1, n, ch, left="b" if n == "h3" else "a")
    for n, ch in (("h1", "tie"), ("h2", "tie")):
        store.submit_label(c2, n, ch)
    for n, ch in (("h1", "a"), ("h2", "b")):
        store.submit_label(c3, n, ch)
    (rows, rep) = store.export_rows(kinds=["human"])
    assert [r["chosen"] for r in rows["train"]] == [[a("answer A0")]]
    assert rep["report"]["tie"] == 1 and rep["report"]["no_majority"] == 1
    assert store.export_rows(kinds=["human"], min_agreement=0.7)[0]["train"] == []
    assert store.export_rows(kinds=["human"], min_labels=4)[0]["train"] == []
    # standard strings and KTO
    std = store.export_rows(kinds=["human"], format="standard")[0]["train"]
    assert std == [{"prompt": "prompt 0", "chosen": "answer A0", "rejected": "answer B0"}]
    kto = store.export_rows(kinds=["human"], unpaired=True)[0]["train"]
    assert kto == [{"prompt": [u("prompt 0")], "completion": [a("answer A0")], "label": True},
                   {"prompt": [u("prompt 0")], "completion": [a("answer B0")], "label": False}]
    store.submit_label(c2, "h3", "both_bad")
    for n in ("h1", "h2"):
        store.submit_label(c2, n, "both_bad", replace=True)
    kto = store.export_rows(kinds=["human"], unpaired=True, both_bad="negatives")[0]["train"]
    assert sum(not r["label"] for r in kto) == 3
    # by comparison id: the tie (c2 is both bad by now) and c1, not the rule-labelled pair
    rows, rep = store.export_rows(comparison_ids=[c1, c2])
    assert [r["chosen"] for r in rows["train"]] == [[a("answer A0")]] and rep["report"] == {
        "exported_pairs": 1, "both_bad": 1, "train_rows": 1, "test_rows": 0}
    assert store.export_rows(comparison_ids=[])[0]["train"] == []
    # datasets and JSONL
    ds = store.export(kinds=["human"])
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 1


def test_soft_labels_carry_each_labels_confidence(store, tmp_path):
    """p_chosen is the mean over a comparison's a/b labels of each one's P(A better) = (1 +- confidence) / 2: the
    app's low / medium / high and a gold model's sureness, not only the vote count; a label without one is sure."""
    from align.preferences import PreferenceDataArguments, load_preferences

    c1, c2, c3 = _queue(store)
    for n in ("h1", "h2"):
        store.add_annotator(n)
    store.submit_label(c1, "h1", "a", confidence=0.5)        # P(A) 0.75
    store.submit_label(c2, "h1", "b", confidence=1 / 3)      # P(A) 1/3 (app's "low")
    store.submit_label(c2, "h2", "b")                        # P(A) 0: the mean is 1/6
    store.submit_label(c3, "h1", "a", confidence=0.0)        # a coin flip that says A: P(A) 0.5
    rows = {r["comparison_id"]: r for r in store.export_rows(soft=True, with_meta=True)[0]["train"]}
    assert rows[c1]["p_chosen"] == pytest.approx(0.75) and rows[c1]["weight"] == pytest.approx(0.5)
    assert rows[c2]["chosen"] == [a("answer B1")] and rows[c2]["p_chosen"] == pytest.approx(5 / 6, abs=1e-6)
    assert rows[c3]["p_chosen"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"confidence must be in \[0, 1\].*got 1.5"):
        store.submit_label(c3, "h2", "a", confidence=1.5)
    assert len(store.labels(comparison_id=c3)) == 1  # the bad label stored nothing
    # what a reward model or DPO trains on with store_soft: p_chosen, with no weight on top
    url = store.engine.url.render_as_string(hide_password=False)
    splits, _ = load_preferences(PreferenceDataArguments(store_url=url, test_fraction=0.0, store_soft=True))
    assert sorted(round(r["p_chosen"], 4) for r in splits["train"]) == [0.5, 0.75, 0.8333]
    assert not any("weight" in r for r in splits["train"])
    hard, _ = load_preferences(PreferenceDataArguments(store_url=url, test_fraction=0.0))
    assert not any("p_chosen" in r for r in hard["train"])


def test_split_is_by_prompt(store, tmp_path):
    items = []
    for i in range(200):
        items += [{"prompt": f"q{i}", "chosen": f"g{i}", "rejected": f"b{i}"},
                  {"prompt": f"q{i}", "chosen": f"g{i}", "rejected": f"c{i}"}]
    store.import_pairs(items, source="split")
    splits, _ = store.export_rows(test_fraction=0.25, seed="s")
    tr = {r["prompt"][0]["content"] for r in splits["train"]}
    te = {r["prompt"][0]["content"] for r in splits["test"]}
    assert not tr & te and len(tr | te) == 200 and 20 < len(te) < 80
    assert store.export_rows(test_fraction=0.25, seed="s")[0] == splits  # deterministic
    res = store.export(tmp_path / "out.jsonl", test_fraction=0.25, seed="s")
    assert sorted(Path(p).name for p in res["files"]) == ["out.test.jsonl", "out.train.jsonl"]
    dd = store.export(test_fraction=0.25, seed="s")
    assert set(dd) == {"train", "test"} and len(dd["test"]) == len(splits["test"])


def test_stats(store):
    c1, c2, c3 = _queue(store)
    for n in ("h1", "h2", "h3"):
        store.add_annotator(n)
    plan = {c1: "aab", c2: "bbb", c3: "abt"}
    for cid, chs in plan.items():
        for n, ch in zip(("h1", "h2", "h3"), chs):
            store.submit_label(cid, n, {"t": "tie"}.get(ch, ch), left="a", seconds=10.0)
    s = store.stats()
    assert s["counts"]["comparisons"] == 3 and s["counts"]["labels"] == 9
    assert s["labels_by_choice"] == {"a": 3, "b": 5, "tie": 1, "both_bad": 0, "skip": 0}
    assert s["labels_per_annotator"]["h1"]["labels"] == 3
    ag = s["agreement"]
    assert ag["comparisons_with_2plus_labels"] == 3 and len(ag["cohen"]) == 3
    assert ag["fleiss_kappa"] is not None and ag["krippendorff_alpha"] is not None
    assert s["position_bias"] == {"decisive_labels_with_side": 8, "left_win_rate": 0.375}
    assert s["seconds_per_label"]["median"] == 10.0
    json.dumps(s)  # JSON-able for the dashboard


# ------------------------------------------------------------------------------------- import
def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_import_one_bad_record_stores_nothing(store, tmp_path):
    recs = [{"prompt": f"q{i}", "chosen": "c", "rejected": f"r{i}"} for i in range(5)]
    recs[2] = {"prompt": "q2", "chosen": "c"}
    recs[3] = {"prompt": [{"role": "bogus", "content": "x"}], "chosen": "c", "rejected": "r"}
    f = _jsonl(tmp_path / "mixed.jsonl", recs)
    with pytest.raises(DataError, match=r"mixed.jsonl:3: .*'rejected'"):
        store.import_file(f)
    assert store.stats()["counts"]["prompts"] == 0
    rep = store.import_file(f, skip_bad=True)
    assert rep.pairs == 3 and [w for w, _ in rep.skipped] == [f"{f}:3", f"{f}:4"]
    assert "prompt[0].role" in rep.skipped[1][1]
    assert "skipped 2 bad records" in rep.summary()
    assert store.stats()["counts"]["comparisons"] == 3
    # re-import is a no-op (dedup)
    rep = store.import_file(f, skip_bad=True)
    assert rep.new_labels == 0 and rep.duplicates == 3


def test_import_limits_and_nul(store, tmp_path):
    small = Store(store.url, max_text_bytes=100)
    f = _jsonl(tmp_path / "big.jsonl", [{"prompt": "q", "chosen": "x" * 101, "rejected": "r"}])
    with pytest.raises(DataError, match=r"big.jsonl:1: field 'chosen'.*101 bytes, over the limit"):
        small.import_file(f)
    assert store.import_file(f).pairs == 1  # default limit 1 MB
    g = _jsonl(tmp_path / "nul.jsonl", [{"prompt": "q\u0000", "chosen": "x", "rejected": "r"}])
    with pytest.raises(DataError, match=r"nul.jsonl:1: field 'prompt'.*NUL"):
        store.import_file(g)
    h = tmp_path / "surrogate.jsonl"
    h.write_text('{"prompt": "q\\ud800", "chosen": "x", "rejected": "r"}\n')
    with pytest.raises(DataError, match=r"surrogate.jsonl:1: .*not valid Unicode"):
        store.import_file(h)
    with pytest.raises(DataError, match="NUL"):
        store.submit_label(1, "dataset", "a", rationale="a\x00b")
    small.close()


def test_import_formats_and_models(store, tmp_path):
    uf = _jsonl(tmp_path / "uf.jsonl", [{"prompt": "Q", "completions": [
        {"model": "m1", "response": "meh", "overall_score": 5},
        {"model": "m2", "response": "great", "overall_score": 9}]}])
    store.import_file(uf)
    rows = store.export_rows(with_meta=True)[0]["train"]
    assert rows[0]["chosen"] == [a("great")] and rows[0]["source"] == "uf.jsonl"
    comp = store.get_comparison(rows[0]["comparison_id"])
    assert {comp.model_a, comp.model_b} == {"m1", "m2"}
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant: A",
                             "rejected": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant: B"}))
    store.import_file(tmp_path / "hh.jsonl.gz")
    std = store.export_rows(format="standard", sources=["hh.jsonl.gz"])[0]["train"]
    assert std == [{"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant:",
                    "chosen": " A", "rejected": " B"}]


def test_cli(store_url, tmp_path, capsys):
    from align.store.__main__ import main

    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"},
                                      {"prompt": "q2", "chosen": "c"}])
    assert main(["--db", store_url, "init"]) == 0
    assert main(["--db", store_url, "import", str(f)]) == 1
    err = capsys.readouterr().err
    assert "p.jsonl:2" in err and "'rejected'" in err and "nothing from" in err
    assert main(["--db", store_url, "import", "--skip-bad", str(f)]) == 0
    assert "skipped 1 bad records" in capsys.readouterr().out
    assert main(["--db", store_url, "annotators", "add", "ann", "--password", "pw",
                 "--role", "admin"]) == 0
    assert main(["--db", store_url, "annotators", "set-role", "ann", "annotator"]) == 0
    assert main(["--db", store_url, "annotators", "set-password", "ann", "--password", "x"]) == 0
    capsys.readouterr()
    assert main(["--db", store_url, "annotators", "list"]) == 0
    assert "ann" in capsys.readouterr().out
    assert main(["--db", store_url, "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["labels"] == 1
    assert main(["--db", store_url, "stats"]) == 0
    assert "Fleiss" in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    assert main(["--db", store_url, "export", str(out), "--standard"]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"prompt": "q", "chosen": "c", "rejected": "r"}]
    assert main(["--db", store_url, "export", "--dataset", str(tmp_path / "ds")]) == 0
    import datasets
    assert len(datasets.load_from_disk(str(tmp_path / "ds"))) == 1
    # a datasets directory imports too
    assert main(["--db", store_url, "import", str(tmp_path / "ds")]) == 0


# --------------------------------------------------------------------- shared data round trip
@needs_shared
@pytest.mark.parametrize("name", ["instruction-data-with-preference.json", "dpo_en_demo.json",
                                  "hh-helpful-base-test.jsonl.gz"])
def test_shared_files_round_trip(store, name):
    from align.data.formats import location, read_records, to_preference

    path = SHARED / name
    want = []
    for k, r in read_records(path):
        p = to_preference(r, location(path, k))
        want.append(json.dumps([p["prompt"], p["chosen"], p["rejected"]], sort_keys=True))
    rep = store.import_file(path)
    assert rep.pairs == len(want) and not rep.skipped
    rows = store.export_rows(sources=[name])[0]["train"]
    got = [json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True) for r in rows]
    # counts match (exact duplicate records are stored once) and texts are equal
    assert len(got) == len(set(want)) == rep.new_comparisons
    assert sorted(got) == sorted(set(want))
    assert got == list(dict.fromkeys(want))  # file order is kept
