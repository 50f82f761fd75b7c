"""Store v2/v3: the migration from v1, gold pairs, swapped re-asks, paused annotators, login failure counts
(SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import random

import pytest
import sqlalchemy as sa
from conftest_store import *  # noqa: F403  (fixtures store, store_url)
from conftest_store import fresh_url, in_threads

from align.store import NotFound, Store
from align.store import schema as S


def _pairs(store, n):
    ids = []
    for i in range(n):
        pid = store.add_prompt(f"q{i}")
        ids.append(store.add_comparison(pid, store.add_response(pid, f"A{i}"), store.add_response(pid, f"B{i}"),
                                        priority=float(n - i)))
    return ids


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_v1_database_migrates_to_the_latest_keeping_its_data(backend, tmp_path):
    url, drop = fresh_url(backend, tmp_path)
    try:
        eng = sa.create_engine(url)
        with eng.begin() as c:  # a database as version 1 made it: no `paused`, no gold / reasks
            S.schema_version.create(c)
            S._v1(c)
            c.execute(sa.text("alter table annotators drop column paused"))
            c.execute(S.schema_version.insert().values(version=1, applied_at=S.utcnow()))
            c.execute(sa.text("insert into annotators (name, role, kind, created_at) "
                              "values ('old', 'annotator', 'human', CURRENT_TIMESTAMP)"))
        eng.dispose()
        s = Store(url)
        assert s.schema_version() == 1
        assert s.get_annotator("old").paused is False  # first use migrates
        assert s.schema_version() == S.LATEST == 3
        s.set_paused("old", True)
        assert s.get_annotator("old").paused and s.list_annotators()[0]["paused"]
        assert s.login_counts() == {}  # v3's table
        s.init()  # idempotent
        assert s.schema_version() == 3
        s.close()
    finally:
        drop()


def test_gold_pairs_leave_the_queue_and_are_served_apart(store):
    ids = _pairs(store, 4)
    store.add_annotator("ann", "pw")
    store.set_gold(ids[0], "b")
    assert store.gold() == {ids[0]: "b"}
    assert store.next_comparison("ann").id == ids[1]  # the gold pair is not in the normal queue
    assert store.progress("ann")["remaining"] == 3
    assert store.next_gold("ann").id == ids[0]
    store.submit_label(ids[0], "ann", "a")
    assert store.next_gold("ann") is None  # each gold pair once per annotator
    with pytest.raises(ValueError, match="gold answer must be one of"):
        store.set_gold(ids[1], "left")
    with pytest.raises(NotFound, match="no comparison 999"):
        store.set_gold(999, "a")
    store.set_gold(ids[0], None)
    assert store.gold() == {}


def test_import_gold_file_uses_the_chosen_side(store, tmp_path):
    f = tmp_path / "gold.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"g{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                         for i in range(6)))
    assert store.import_gold(f) == 6
    gold = store.gold()
    assert len(gold) == 6
    for cid, ans in gold.items():
        c = store.get_comparison(cid)
        assert (c.text_a if ans == "a" else c.text_b).startswith("good")
    f.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(Exception, match="gold.jsonl:1"):
        store.import_gold(f)
    assert len(store.gold()) == 6


def test_reasks_come_back_after_a_gap_once_and_follow_undo(store):
    ids = _pairs(store, 8)
    store.add_annotator("ann", "pw")
    labs = [store.submit_label(cid, "ann", "a" if i % 2 else "b", left="a") for i, cid in enumerate(ids[:6])]
    got = {store.next_reask("ann", min_gap=3, rng=random.Random(i)).id for i in range(40)}
    assert got == {lab.id for lab in labs[:3]}  # the 3 newest labels are too recent
    rid = store.submit_reask(labs[0].id, "b", left="b", seconds=1.5, request_id="r1")
    assert store.submit_reask(labs[0].id, "a", left="b", request_id="r1") == rid  # retried: unchanged
    (r,) = store.reasks()
    assert (r["annotator"], r["choice"], r["first_choice"], r["left_side"], r["first_left"]) == \
        ("ann", "b", "b", "b", "a")
    assert all(store.next_reask("ann", min_gap=3, rng=random.Random(i)).id != labs[0].id for i in range(20))
    store.delete_reask(rid)
    assert store.reasks() == []
    rid = store.submit_reask(labs[5].id, "a", left="b")
    store.undo_last("ann")  # labs[5]: its re-ask goes with it
    assert store.reasks() == []
    with pytest.raises(NotFound, match="no label"):
        store.submit_reask(labs[5].id, "a")


def test_login_counts_change_atomically_across_connections(store_url):
    stores = [Store(store_url) for _ in range(4)]  # as four app processes would
    stores[0].init()

    def bump(s):
        for _ in range(10):
            s.update_login_count("account", "root", lambda c: ((c[0] if c else 0) + 1, 1.0, 2.0))
    in_threads(bump, stores)
    assert stores[1].login_counts() == {("account", "root"): (40, 1.0, 2.0)}
    got = stores[2].login_counts([("account", "root"), ("address", "10.0.0.1")])
    assert got == {("account", "root"): (40, 1.0, 2.0)}
    assert stores[3].update_login_count("account", "root", lambda c: None) == ((40, 1.0, 2.0), None)
    assert stores[0].login_counts() == {}
    for s in stores:
        s.close()
