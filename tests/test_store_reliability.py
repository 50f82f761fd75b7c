"""Reliability of the store under concurrent writers, kill -9 and arbitrary text (both backends).

- 50 writer processes x 200 labels: every acknowledged label is stored exactly once.
- kill -9 of writers mid-run: the database is intact and every acknowledged label is present.
- SQLite group commit: a writer returns only after an fsync that began after its commit; writers share them.
- hypothesis: import -> export round trips any Unicode text; NUL and over-limit texts are refused.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import struct
import threading
import time

import pytest
import sqlalchemy as sa
from conftest_store import *  # noqa: F403  (fixtures store, store_url)
from conftest_store import BACKENDS, fresh_url, in_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.store import DataError, LabelExists, NotFound, Store

WRITERS, LABELS = 50, 200


def _setup(url: str, n_comparisons: int, n_writers: int) -> list[int]:
    s = Store(url).init()
    s.import_pairs([{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
                    for i in range(n_comparisons)], priority=1.0)
    for w in range(n_writers):
        s.ensure_annotator(f"w{w}", kind="human")
    with s.engine.connect() as c:
        cids = c.execute(sa.text("select id from comparisons order by id")).scalars().all()
    s.close()  # nothing open across fork
    return cids


def _writer(url: str, w: int, cids: list[int], ack_path: str, go) -> None:
    try:
        store = Store(url)
        fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        go.wait()
        for i, cid in enumerate(cids):
            rid = f"w{w}-{cid}"
            lab = store.submit_label(cid, f"w{w}", "ab"[(w + i) % 2], left="ab"[i % 2],
                                     seconds=1.0, request_id=rid)
            os.write(fd, f"{cid} {lab.id}\n".encode())  # acknowledged: committed
            if i % 10 == 0:  # a client retry of the same request changes nothing
                assert store.submit_label(cid, f"w{w}", "tie", request_id=rid).id == lab.id
        os.close(fd)
        store.engine.dispose()
        os._exit(0)
    except BaseException as e:  # pragma: no cover - reported through the exit code
        print(f"writer {w}: {e!r}", flush=True)
        os._exit(1)


def _acks(path) -> set[tuple[int, int]]:
    if not os.path.exists(path):
        return set()
    with open(path) as fh:
        return {tuple(map(int, line.split())) for line in fh.read().split("\n")[:-1]}


def _start(url, cids, tmp_path, n):
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, w, cids, str(tmp_path / f"ack{w}"), go))
             for w in range(n)]
    for p in procs:
        p.start()
    go.set()
    return procs


def _stored(url) -> dict[tuple[str, int], tuple[int, str]]:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with eng.connect() as c:
        rows = c.execute(sa.text("select a.name, l.comparison_id, l.id, l.request_id from labels l "
                                 "join annotators a on a.id = l.annotator_id "
                                 "where a.kind = 'human'")).all()
    eng.dispose()
    out = {}
    for name, cid, lid, rid in rows:
        assert (name, cid) not in out, "two labels for one (annotator, comparison)"
        out[(name, cid)] = (lid, rid)
    return out


def test_concurrent_writers_every_ack_stored_once(store_url, tmp_path):
    cids = _setup(store_url, LABELS, WRITERS)
    t0 = time.time()
    procs = _start(store_url, cids, tmp_path, WRITERS)
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    elapsed = time.time() - t0
    stored = _stored(store_url)
    assert len(stored) == WRITERS * LABELS
    for w in range(WRITERS):
        acks = _acks(tmp_path / f"ack{w}")
        assert len(acks) == LABELS
        for cid, lid in acks:
            assert stored[(f"w{w}", cid)] == (lid, f"w{w}-{cid}")
    print(f"{WRITERS} writers x {LABELS} labels: {elapsed:.1f}s")


def test_sqlite_group_commit_syncs_before_returning_and_shares_fsyncs(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/g.db"
    cids = _setup(url, 40, 8)
    store = Store(url)
    with store.engine.connect() as c:  # commits only write the WAL; the store syncs it (Store._sync_wal)
        assert c.exec_driver_sql("pragma synchronous").scalar() == 1
        assert c.exec_driver_sql("pragma wal_autocheckpoint").scalar() == 0  # the store checkpoints, unlocked
    checkpoints, checkpoint = [], store._checkpoint
    store._checkpoint = lambda: (checkpoints.append(1), checkpoint())
    syncs, real = [], os.fdatasync

    def slow_sync(fd):  # a slow disk, so that writers pile up behind one fsync
        time.sleep(0.01)
        real(fd)
        syncs.append(fd)
    monkeypatch.setattr(os, "fdatasync", slow_sync)
    mine, committed = threading.local(), store._committed

    def ticket():
        mine.ticket = committed()
        return mine.ticket
    store._committed = ticket
    late = []

    def writer(w):
        for cid in cids:
            store.submit_label(cid, f"w{w}", "a", request_id=f"w{w}-{cid}")
            with open(f"{tmp_path}/g.db-sync", "rb") as fh:
                synced = struct.unpack("<QQ", fh.read(16))[1]
            if synced < mine.ticket:  # acknowledged before an fsync covered it
                late.append((w, cid))
    in_threads(writer, range(8))
    assert late == []
    assert sum(len(store.labels(annotator=f"w{w}")) for w in range(8)) == 8 * 40
    assert len(syncs) < 8 * 40 / 2, len(syncs)  # most commits rode on another writer's fsync
    assert store._checkpointing.acquire(timeout=30) and checkpoints == [1]  # after the 250th commit
    store.close()


def test_batched_labels_from_threads_commit_together_and_keep_the_one_label_rules(store_url):
    cids = _setup(store_url, 30, 10)
    store = Store(store_url, batch_labels=True)
    txs, tx = [], store._tx
    store._tx = lambda fn, **kw: (txs.append(kw.get("write", True)), tx(fn, **kw))[1]
    errors = []

    def writer(w):
        for i, cid in enumerate(cids):
            lab = store.submit_label(cid, f"w{w}", "ab"[i % 2], left="a", request_id=f"w{w}-{cid}")
            assert (lab.annotator, lab.comparison_id, lab.choice) == (f"w{w}", cid, "ab"[i % 2])
            if i == 3:  # a retried request, a second label, a comparison that does not exist
                assert store.submit_label(cid, f"w{w}", "tie", request_id=f"w{w}-{cid}").id == lab.id
                for bad, err in ((dict(comparison_id=cid), LabelExists), (dict(comparison_id=10**6), NotFound)):
                    with contextlib.suppress(err):  # the expected error; any other fails the thread
                        store.submit_label(**bad, annotator=f"w{w}", choice="a")
                        errors.append(f"no {err.__name__}")
    in_threads(writer, range(10))
    assert errors == []
    assert sorted((lab.annotator, lab.comparison_id) for w in range(10) for lab in store.labels(annotator=f"w{w}")) \
        == sorted((f"w{w}", c) for w in range(10) for c in cids)
    assert txs.count(True) < 10 * 30 / 2  # several labels per transaction
    store.close()


def test_kill_9_writers_keeps_acknowledged_labels(store_url, tmp_path):
    n = 12
    cids = _setup(store_url, 400, n)
    procs = _start(store_url, cids, tmp_path, n)
    deadline = time.time() + 60
    while time.time() < deadline:  # let them get going, then kill mid-run
        if sum(len(_acks(tmp_path / f"ack{w}")) for w in range(n)) >= 600:
            break
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()
    assert all(p.exitcode == -signal.SIGKILL for p in procs), [p.exitcode for p in procs]
    if store_url.startswith("sqlite"):
        eng = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
        with eng.connect() as c:
            assert c.exec_driver_sql("pragma integrity_check").scalar() == "ok"
            assert c.exec_driver_sql("pragma foreign_key_check").all() == []
        eng.dispose()
    stored = _stored(store_url)
    total = 0
    for w in range(n):
        for cid, lid in _acks(tmp_path / f"ack{w}"):
            assert stored[(f"w{w}", cid)][0] == lid
            total += 1
    assert 0 < total <= len(stored) < n * 400  # killed mid-run; nothing acked was lost
    s = Store(store_url)  # still writable (no stale lock)
    s.submit_label(cids[-1], "w0", "a", replace=True)
    s.close()


# --------------------------------------------------------------------------- property tests
TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
               max_size=60)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recs=st.lists(st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
                     min_size=1, max_size=6))
def test_import_export_round_trip_any_unicode(backend, tmp_path_factory, recs):
    url, drop = fresh_url(backend, tmp_path_factory.mktemp("rt"))
    try:
        f = tmp_path_factory.mktemp("in") / "pairs.jsonl"
        f.write_text("".join(json.dumps(r, ensure_ascii=bool(len(r["prompt"]) % 2)) + "\n"
                             for r in recs), encoding="utf-8")
        s = Store(url)
        rep = s.import_file(f)
        assert rep.pairs == len(recs)
        rows = s.export_rows(format="standard")[0]["train"]
        want = list(dict.fromkeys((r["prompt"], r["chosen"], r["rejected"]) for r in recs))
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == want
        s.close()
    finally:
        drop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_empty_texts(backend, tmp_path):
    url, drop = fresh_url(backend, tmp_path)
    try:
        big = "é" * 500_000  # 1,000,000 UTF-8 bytes: exactly the default limit
        f = tmp_path / "big.jsonl"
        f.write_text(json.dumps({"prompt": "", "chosen": big, "rejected": ""}) + "\n" +
                     json.dumps({"prompt": "q", "chosen": big + "x", "rejected": "r"}) + "\n")
        s = Store(url)
        with pytest.raises(DataError, match=r"big.jsonl:2: field 'chosen'.*1,000,001 bytes"):
            s.import_file(f)
        rep = s.import_file(f, skip_bad=True)
        assert rep.pairs == 1 and len(rep.skipped) == 1
        rows = s.export_rows(format="standard")[0]["train"]
        assert rows == [{"prompt": "", "chosen": big, "rejected": ""}]
        roomy = Store(url, max_text_bytes=2_000_000)
        assert roomy.import_file(f).pairs == 2
        s.close()
        roomy.close()
    finally:
        drop()
