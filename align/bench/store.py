"""``python -m align.bench store``: preference-store throughput and latency.

Measures, on SQLite (a fresh file) and PostgreSQL (``--pg_url`` or ``$ALIGN_TEST_PG_URL``; a fresh
schema that is dropped afterwards):
- label-write latency p50 / p99 (``submit_label``: acknowledged once committed and on disk) with 1, 10 and
  50 concurrent writer processes, beside the same INSERT by as many raw sqlite3 processes; with
  ``--threads``, also by as many threads of one process with ``Store(batch_labels=True)`` (the app's case);
- import rows/s (HH-RLHF test file from ../shared/data, and synthetic pairs in bulk);
- export time for 100k labelled pairs (``export_rows``, conversational).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from align.store.store import Store

HH = Path(__file__).resolve().parents[2].parent / "shared/data/preference/hh-helpful-base-test.jsonl.gz"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _writer(url: str, wid: int, cids: list[int], go, out) -> None:
    store = Store(url)
    name = f"w{wid}"
    lat = []
    go.wait()
    for i, cid in enumerate(cids):
        t = time.perf_counter()
        store.submit_label(cid, name, "a" if (i + wid) % 2 else "b", left="a",
                           request_id=f"{name}-{cid}", seconds=1.0)
        lat.append(time.perf_counter() - t)
    out.put(lat)
    store.close()


def _raw_writer(path: str, wid: int, aid: int, cids: list[int], go, out) -> None:
    """The reference: the same label row written with the sqlite3 module alone (WAL, synchronous=FULL,
    BEGIN IMMEDIATE, busy_timeout), i.e. what a durable committed INSERT costs without the store."""
    import sqlite3

    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("pragma journal_mode=WAL")
    con.execute("pragma synchronous=FULL")
    con.execute("pragma busy_timeout=30000")
    sql = ("insert into labels (comparison_id, annotator_id, choice, left_side, seconds, request_id, created_at) "
           "values (?, ?, ?, 'a', 1.0, ?, ?) on conflict do nothing")
    lat = []
    go.wait()
    for i, cid in enumerate(cids):
        t = time.perf_counter()
        con.execute("begin immediate")
        con.execute(sql, (cid, aid, "a" if (i + wid) % 2 else "b", f"raw{wid}-{cid}", "2026-01-01 00:00:00"))
        con.execute("commit")
        lat.append(time.perf_counter() - t)
    out.put(lat)
    con.close()


def _threads(url: str, writers: int, cids: list[int], go, out) -> None:
    """``writers`` threads of one process on one ``Store(batch_labels=True)``, like the app server's."""
    store = Store(url, batch_labels=True)
    lats = [[] for _ in range(writers)]

    def one(w):
        name = f"t{w}"
        go.wait()
        for i, cid in enumerate(cids):
            t = time.perf_counter()
            store.submit_label(cid, name, "a" if (i + w) % 2 else "b", left="a", request_id=f"{name}-{cid}",
                               seconds=1.0)
            lats[w].append(time.perf_counter() - t)
    threads = [threading.Thread(target=one, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lat in lats:
        out.put(lat)
    store.close()


def bench_writes(url: str, writers: int, per_writer: int, raw: bool = False, threads: bool = False) -> dict:
    store = Store(url).init()
    items = [{"prompt": f"bench prompt {i} {uuid.uuid4().hex}", "chosen": "x", "rejected": "y"}
             for i in range(per_writer)]
    store.import_pairs(items, source="bench-writes", priority=1.0)
    with store.engine.connect() as c:
        cids = [r[0] for r in c.execute(sa.text(
            "select id from comparisons where source='bench-writes' order by id"))][-per_writer:]
    tag = "raw" if raw else "t" if threads else "w"
    aids = [store.ensure_annotator(f"{tag}{w}", kind="human").id for w in range(writers)]
    store.close()
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    if raw:
        path = sa.make_url(url).database
        procs = [ctx.Process(target=_raw_writer, args=(path, w, aids[w], cids, go, out)) for w in range(writers)]
    elif threads:
        procs = [ctx.Process(target=_threads, args=(url, writers, cids, go, out))]
    else:
        procs = [ctx.Process(target=_writer, args=(url, w, cids, go, out)) for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    go.set()
    lat = []
    for _ in range(writers):
        lat += out.get()
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return {"writers": writers, "labels": len(lat), "p50_ms": 1000 * _pct(lat, 0.5),
            "p99_ms": 1000 * _pct(lat, 0.99), "labels_per_s": len(lat) / wall}


def bench_import(url: str, n_synth: int) -> dict:
    store = Store(url).init()
    res = {}
    if HH.exists():
        r = store.import_file(HH)
        res["hh_rows_per_s"] = r.records / r.seconds
    items = [{"prompt": f"synthetic prompt {i}", "chosen": f"good answer {i} " * 8,
              "rejected": f"bad answer {i} " * 8} for i in range(n_synth)]
    t = time.perf_counter()
    store.import_pairs(items, source="synthetic")
    res["bulk_rows_per_s"] = n_synth / (time.perf_counter() - t)
    t = time.perf_counter()
    splits, _ = store.export_rows(sources=["synthetic"])
    res["export_s"] = time.perf_counter() - t
    res["export_rows"] = len(splits["train"])
    store.close()
    return res


def _pg_fresh(url: str) -> tuple[str, callable]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text(f"create schema {schema}"))
    u = sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop():
        with eng.begin() as c:
            c.execute(sa.text(f"drop schema {schema} cascade"))
        eng.dispose()
    return u.render_as_string(hide_password=False), drop


def hardware() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):  # no lscpu, or no model line
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


@dataclass
class BenchArgs:
    """preference store: label-write latency, import and export throughput"""

    pg_url: str | None = field(default_factory=lambda: os.environ.get("ALIGN_TEST_PG_URL"),
                               metadata={"help": "PostgreSQL URL (default: $ALIGN_TEST_PG_URL; none: SQLite only)"})
    writers: list[int] = field(default_factory=lambda: [1, 10, 50], metadata={"help": "concurrent writer processes"})
    labels: int = field(default=2000, metadata={"help": "total labels per writer setting"})
    pairs: int = field(default=100_000, metadata={"help": "pairs for import/export"})
    no_sqlite: bool = False
    no_raw: bool = field(default=False, metadata={"help": "skip the raw sqlite3 reference writers"})
    writes_only: bool = field(default=False, metadata={"help": "only the label-write latency runs"})
    threads: bool = field(default=False, metadata={
        "help": "also writers as threads of one process with Store(batch_labels=True), as in the app server"})


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (args,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench store")
    backends = [] if args.no_sqlite else ["sqlite"]
    if args.pg_url:
        backends.append("postgresql")
    rows = []
    for be in backends:
        with tempfile.TemporaryDirectory() as tmp:
            drop = None
            if be == "sqlite":
                url = f"sqlite:///{tmp}/bench.db"
            else:
                url, drop = _pg_fresh(args.pg_url)
            try:
                for w in args.writers:
                    kinds = ["store"] + (["raw"] if be == "sqlite" and not args.no_raw else []) \
                        + (["threads"] if args.threads else [])
                    for kind in kinds:
                        r = bench_writes(url, w, max(1, args.labels // w), raw=kind == "raw",
                                         threads=kind == "threads")
                        what = {"store": "label write (Store.submit_label), processes",
                                "raw": "raw sqlite3 (reference), processes",
                                "threads": "label write, threads of one process (batch_labels)"}[kind]
                        rows.append((be, f"{what}: {w} writer(s)",
                                     f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                                     f"{r['labels_per_s']:.0f} labels/s ({r['labels']} labels)"))
                        print(*rows[-1], sep=" | ", flush=True)
                if args.writes_only:
                    continue
                r = bench_import(url, args.pairs)
                if "hh_rows_per_s" in r:
                    rows.append((be, "import HH-RLHF file (2,354 records)",
                                 f"{r['hh_rows_per_s']:.0f} rows/s"))
                rows.append((be, f"import {args.pairs:,} synthetic pairs (bulk)",
                             f"{r['bulk_rows_per_s']:.0f} rows/s"))
                rows.append((be, f"export {r['export_rows']:,} pairs",
                             f"{r['export_s']:.1f} s"))
                for row in rows[-3:]:
                    print(*row, sep=" | ", flush=True)
            finally:
                if drop:
                    drop()
    print(f"\nhardware: {hardware()}")
    print("| backend | measurement | result |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
