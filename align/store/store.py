"""The preference store: prompts, candidate responses, comparisons and every label.

One ``Store`` per process (it owns a SQLAlchemy engine and its connection pool). Every write is one
short transaction, retried on SQLite "database is locked" and PostgreSQL serialization failures /
deadlocks. See docs/store.md for the guarantees and the policies (relabelling, queue, export).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import random
import secrets
import sqlite3
import struct
import threading
import time
from base64 import b64decode, b64encode
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's busy_timeout alone
    fcntl = None

from align.data.formats import DataError, location, normalize_messages, read_records, to_preference
from align.data.prompts import content_hash
from align.store import schema as S

log = logging.getLogger("align.store")
DEFAULT_URL = "sqlite:///data/preferences.db"
CHOICES = ("a", "b", "tie", "both_bad", "skip")
DECISIVE = ("a", "b")
ROLES = ("admin", "annotator")
KINDS = ("human", "ai", "rule")
DEFAULT_MAX_TEXT_BYTES = 1_000_000
_CHUNK = 400
_CHECKPOINT_EVERY = 250  # group-committed writes between WAL checkpoints (~1,000 pages, SQLite's default)
_WAL_LIMIT = 16 << 20  # and after a big one (an import); the WAL is cut back to this size when reused


# ------------------------------------------------------------------------------------------ errors
class StoreError(Exception):
    """Base class of the store's errors."""


class NotFound(StoreError, LookupError):
    """A comparison / annotator / prompt / response that does not exist."""


class LabelExists(StoreError):
    """This annotator already labelled this comparison (pass ``replace=True`` to change it)."""


class RequestIdConflict(StoreError):
    """A request id reused for a different annotator or comparison."""


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    role: str
    kind: str
    created_at: datetime | None = None
    paused: bool = False


@dataclass(frozen=True)
class Label:
    id: int
    comparison_id: int
    annotator: str
    choice: str
    left: str | None
    rationale: str | None
    confidence: float | None
    seconds: float | None
    request_id: str | None
    created_at: datetime | None = None
    annotator_id: int | None = None


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt_id: int
    prompt: list[dict]          # messages
    response_a_id: int
    response_b_id: int
    response_a: list[dict]      # completion messages (usually one assistant message)
    response_b: list[dict]
    model_a: str
    model_b: str
    priority: float | None
    source: str | None = None

    @property
    def text_a(self) -> str:
        return _join(self.response_a)

    @property
    def text_b(self) -> str:
        return _join(self.response_b)


@dataclass
class ImportReport:
    file: str
    records: int = 0
    pairs: int = 0
    new_prompts: int = 0
    new_responses: int = 0
    new_comparisons: int = 0
    new_labels: int = 0
    duplicates: int = 0          # pairs already in the store with the same label
    conflicts: int = 0           # pairs already labelled the other way by this labeller (kept)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, error) with --skip_bad
    seconds: float = 0.0

    def summary(self) -> str:
        s = (f"{self.file}: {self.records} records -> {self.pairs} pairs; new: "
             f"{self.new_prompts} prompts, {self.new_responses} responses, "
             f"{self.new_comparisons} comparisons, {self.new_labels} labels; "
             f"{self.duplicates} duplicates, {self.conflicts} conflicts; {self.seconds:.1f}s")
        if self.skipped:
            s += f"\n  skipped {len(self.skipped)} bad records, first: " + "; ".join(
                msg for _, msg in self.skipped[:5])
        return s


# ---------------------------------------------------------------------------------------- helpers
def _join(msgs: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in msgs)


def storable(text: str) -> str:
    """Generated text the store accepts: NUL removed (PostgreSQL text cannot hold it), lone surrogates
    replaced (a byte-level model can emit both). Text people give is checked instead (``check_text``)."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def check_text(s: Any, where: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
    """A storable text: a str without NUL (PostgreSQL text cannot hold it), valid UTF-8 (no lone
    surrogates) and at most ``max_bytes`` UTF-8 bytes."""
    if not isinstance(s, str):
        raise DataError(f"{where}: expected a string, got {type(s).__name__}")
    if "\x00" in s:
        raise DataError(f"{where}: text contains a NUL character (\\x00) at position "
                        f"{s.index(chr(0))}; NUL cannot be stored")
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: text is not valid Unicode ({e.reason} at position "
                        f"{e.start})") from None
    if n > max_bytes:
        raise DataError(f"{where}: text is {n:,} bytes, over the limit of {max_bytes:,} bytes "
                        "(raise it with max_text_bytes / --max_text_bytes)")
    return s


def _check_messages(msgs: list[dict], where: str, max_bytes: int) -> list[dict]:
    for i, m in enumerate(msgs):
        check_text(m["content"], f"{where}[{i}].content", max_bytes)
    return msgs


def _as_prompt(prompt: str | Sequence[dict], where: str = "prompt") -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return normalize_messages(list(prompt), where, "prompt", allow_empty_list=True)


def _as_completion(resp: str | Sequence[dict], where: str = "response") -> list[dict]:
    if isinstance(resp, str):
        return [{"role": "assistant", "content": resp}]
    msgs = normalize_messages(list(resp), where, "response")
    return msgs


def _completion_cols(msgs: list[dict]) -> dict:
    single = len(msgs) == 1 and msgs[0]["role"] == "assistant"
    return {"text": _join(msgs), "messages": None if single else msgs, "content_hash": content_hash(msgs)}


def _completion_of(text: str, messages: Any) -> list[dict]:
    if messages:
        return messages if isinstance(messages, list) else json.loads(messages)
    return [{"role": "assistant", "content": text}]


def hash_password(password: str, *, n: int = 2 ** 14, r: int = 8, p: int = 1) -> str:
    """``scrypt$n$r$p$salt$hash`` with a random 16-byte salt per user (stdlib hashlib.scrypt)."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${b64encode(salt).decode()}${b64encode(dk).decode()}"


_DUMMY_HASH = None


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; also spends the hashing time when there is no stored hash."""
    global _DUMMY_HASH
    if not stored:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hash_password("x")
        stored, ok = _DUMMY_HASH, False
    else:
        ok = True
    try:
        algo, n, r, p, salt, dk = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(b64decode(dk)))
    except (ValueError, TypeError, MemoryError):  # a malformed stored hash (binascii.Error is a ValueError)
        return False
    return hmac.compare_digest(got, b64decode(dk)) and ok


def _retriable(e: sa.exc.DBAPIError) -> bool:
    if e.connection_invalidated:
        return True
    orig = getattr(e, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    msg = str(orig).lower()
    return isinstance(e, sa.exc.OperationalError) and ("locked" in msg or "busy" in msg)


# ------------------------------------------------------------------------------------------ store
class Store:
    """The preference store.

    ``Store(url=None)``: ``url`` is any SQLAlchemy URL; default ``$ALIGN_STORE_URL`` or
    ``sqlite:///data/preferences.db`` (relative to the cwd). SQLite runs in WAL mode with foreign
    keys on, ``busy_timeout`` and ``synchronous=FULL`` (every acknowledged label is on disk; on a
    file database with flock, through the store's group commit: see ``_sync_wal``).
    The schema is created / migrated on first use (or explicitly with ``init()``).
    """

    def __init__(self, url: str | None = None, *, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
                 busy_timeout_ms: int = 30_000, synchronous: str = "FULL", retries: int = 20,
                 echo: bool = False, batch_labels: bool = False):
        self.url = url or os.environ.get("ALIGN_STORE_URL") or DEFAULT_URL
        self.max_text_bytes = max_text_bytes
        self.retries = retries
        u = sa.make_url(self.url)
        self.dialect = u.get_backend_name()
        self._lock_path = self._wal_path = None
        self._tlock, self._synclock, self._checkpointing = threading.Lock(), threading.Lock(), threading.Lock()
        self._lock_fd = self._sync_fd = self._lock_pid = None
        if self.dialect == "sqlite":
            db = u.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).parent.mkdir(parents=True, exist_ok=True)
                if fcntl is not None:
                    self._lock_path = db + "-writelock"
                    if synchronous.upper() == "FULL":  # FULL's guarantee by group commit (_sync_wal)
                        self._wal_path, synchronous = db + "-wal", "NORMAL"
            # No rollback on returning a connection to the pool: every use ends in COMMIT or
            # ROLLBACK already (_tx), and that extra round trip was ~3% of a label write.
            self.engine = sa.create_engine(u, echo=echo, pool_reset_on_return=None,
                                           connect_args={"timeout": busy_timeout_ms / 1000})
            _sqlite_setup(self.engine, busy_timeout_ms, synchronous, self._wal_path is None)
        else:
            # No pre-ping (a round trip per transaction): a dropped connection raises an
            # invalidated-connection error that _tx retries.
            self.engine = sa.create_engine(u, echo=echo, pool_size=2, max_overflow=8)
        self._ready = False
        self._batcher = _LabelBatcher(self) if batch_labels else None
        self._annotator_ids: dict[str, int] = {}
        self._queue_cache = None

    # ------------------------------------------------------------------------ plumbing
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
            os.close(self._sync_fd)
        self._lock_fd = self._sync_fd = self._lock_pid = None

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def init(self) -> "Store":
        """Create the schema or apply pending migrations (idempotent, safe to race)."""
        self._tx(S.migrate, ensure=False)
        self._ready = True
        return self

    def schema_version(self) -> int:
        return self._tx(S.current_version, write=False, ensure=False)

    def _ensure(self) -> None:
        if not self._ready:
            if self._tx(S.current_version, write=False, ensure=False) < S.LATEST:
                self.init()
            self._ready = True

    def _tx(self, fn: Callable[[sa.Connection], Any], *, write: bool = True,
            ensure: bool = True) -> Any:
        """Run ``fn(conn)`` in one transaction; retry it on busy / serialization errors."""
        if ensure:
            self._ensure()
        delay = 0.005
        for attempt in range(self.retries):
            try:
                with self.engine.connect() as conn:
                    if write:
                        conn.execution_options(align_write=True)
                    # the lock covers BEGIN..COMMIT only, not the pool's checkout / reset-on-return
                    with self._write_lock() if write else nullcontext():
                        with conn.begin():
                            out = fn(conn)
                        seq = self._committed() if write else 0
                if seq and (self._sync_wal(seq) > _WAL_LIMIT or seq % _CHECKPOINT_EVERY == 0):
                    self._checkpoint_soon()
                return out
            except sa.exc.DBAPIError as e:
                if attempt == self.retries - 1 or not _retriable(e):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    @contextmanager
    def _write_lock(self):
        """SQLite file databases: writers of this project queue on an flock (woken by the kernel
        the moment it is free) instead of polling SQLite's busy handler, which keeps p99 latency
        bounded with many writer processes. Released by the kernel if the process dies."""
        if self._lock_path is None:
            yield
            return
        with self._tlock:
            if self._lock_pid != os.getpid():  # (re)open after fork: flocks follow the open file
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
                self._sync_fd = os.open(self._lock_path[:-len("writelock")] + "sync", os.O_RDWR | os.O_CREAT, 0o666)
                self._lock_pid = os.getpid()
                self._checkpointing = threading.Lock()  # not one a forked parent's thread held
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # Group commit (SQLite file databases with synchronous=FULL). A commit under the write lock only
    # writes the WAL (synchronous=NORMAL: ~0.05 ms instead of an fsync of 0.1-4 ms on this disk) and
    # takes a ticket; the writer then leaves the write lock and waits for its ticket to be on disk:
    # the first in the sync queue fdatasyncs the WAL for every commit made so far, and those queued
    # behind it find their ticket covered and return without an fsync of their own -- PostgreSQL's
    # WAL flush works the same way. So 50 writers share one fsync instead of queueing through 50,
    # and a label is still on disk before its call returns. The tickets are two counters in
    # <db>-sync (committed, synced), changed only under the write / sync flocks. Frames that a
    # checkpoint moved into the database are already synced (NORMAL syncs the WAL before a
    # checkpoint and the database after it). SQLite's automatic checkpoint would run inside a COMMIT,
    # holding up every writer queued behind it (up to 160 ms here); the store runs a PASSIVE one
    # instead, after every _CHECKPOINT_EVERY-th commit and after a commit that left the WAL over
    # _WAL_LIMIT, outside the locks.
    def _checkpoint_soon(self) -> None:
        """A PASSIVE checkpoint in a thread of its own, one at a time per process: outside both locks, and
        no caller waits for it (the labels are on disk already; an interrupted checkpoint is harmless)."""
        if self._checkpointing.acquire(blocking=False):
            threading.Thread(target=self._checkpoint, name="align-checkpoint", daemon=True).start()

    def _checkpoint(self) -> None:
        try:
            raw = self.engine.raw_connection()  # outside any transaction (a checkpoint cannot run in one)
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                raw.close()
        except (sa.exc.DBAPIError, sqlite3.Error) as e:  # busy, or the store closed meanwhile: the next one will do
            log.info("WAL checkpoint skipped: %s", e)
        finally:
            self._checkpointing.release()

    def _committed(self) -> int:
        """Called under the write lock after COMMIT: this commit's ticket (0: no group commit)."""
        if self._wal_path is None:
            return 0
        n = struct.unpack("<Q", os.pread(self._sync_fd, 8, 0).ljust(8, b"\0"))[0] + 1
        os.pwrite(self._sync_fd, struct.pack("<Q", n), 0)
        return n

    def _sync_wal(self, ticket: int) -> int:
        """Return once this commit's ticket is on disk; the WAL's size if this call synced it, else 0."""
        with self._synclock:  # threads of this process, then processes
            fcntl.flock(self._sync_fd, fcntl.LOCK_EX)
            try:
                committed, synced = struct.unpack("<QQ", os.pread(self._sync_fd, 16, 0).ljust(16, b"\0"))
                if synced >= ticket:
                    return 0  # an fsync that started after our commit covered it
                try:
                    fd = os.open(self._wal_path, os.O_RDONLY)
                except FileNotFoundError:  # the last connection checkpointed (synced) and removed it
                    return 0
                try:
                    os.fdatasync(fd)  # as SQLite syncs: the data, not the mtime
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                os.pwrite(self._sync_fd, struct.pack("<Q", committed), 8)
                return size
            finally:
                fcntl.flock(self._sync_fd, fcntl.LOCK_UN)

    def _aid(self, conn: sa.Connection, annotator: str | int) -> int:
        if isinstance(annotator, int):
            return annotator
        aid = self._annotator_ids.get(annotator)
        if aid is None:
            aid = conn.execute(sa.select(S.annotators.c.id)
                               .where(S.annotators.c.name == annotator)).scalar()
            if aid is None:
                raise NotFound(f"no annotator named {annotator!r} (add one with "
                               "`python -m align.store annotators add`)")
            self._annotator_ids[annotator] = aid
        return aid

    # ---------------------------------------------------------------------- annotators
    def add_annotator(self, name: str, password: str | None = None, role: str = "annotator",
                      kind: str = "human") -> Annotator:
        """Add an annotator (``kind`` 'human' | 'ai' | 'rule'; ``role`` 'admin' | 'annotator')."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_text(name, "annotator name", 200)
        if not name.strip():
            raise ValueError("annotator name is empty")
        ph = hash_password(password) if password else None

        def fn(conn):
            if conn.execute(sa.select(S.annotators.c.id)
                            .where(S.annotators.c.name == name)).first():
                raise StoreError(f"annotator {name!r} already exists")
            conn.execute(S.annotators.insert().values(name=name, role=role, kind=kind,
                                                      password_hash=ph, created_at=S.utcnow()))
        self._tx(fn)
        return self.get_annotator(name)

    def get_annotator(self, name: str) -> Annotator:
        row = self._tx(lambda c: c.execute(sa.select(S.annotators)
                                           .where(S.annotators.c.name == name)).first(),
                       write=False)
        if row is None:
            raise NotFound(f"no annotator named {name!r}")
        return Annotator(row.id, row.name, row.role, row.kind, row.created_at, bool(row.paused))

    def ensure_annotator(self, name: str, kind: str = "rule", role: str = "annotator") -> Annotator:
        """Get or create a password-less labeller (for AI / rule / dataset labels)."""
        try:
            return self.get_annotator(name)
        except NotFound:
            try:
                return self.add_annotator(name, None, role=role, kind=kind)
            except (StoreError, sa.exc.IntegrityError):  # created concurrently
                return self.get_annotator(name)

    def list_annotators(self) -> list[dict]:
        def fn(conn):
            n = (sa.select(sa.func.count()).where(S.labels.c.annotator_id == S.annotators.c.id)
                 .scalar_subquery())
            rows = conn.execute(sa.select(S.annotators, n.label("labels"))
                                .order_by(S.annotators.c.id)).all()
            return [{"id": r.id, "name": r.name, "role": r.role, "kind": r.kind,
                     "labels": r.labels, "has_password": bool(r.password_hash),
                     "paused": bool(r.paused), "created_at": r.created_at} for r in rows]
        return self._tx(fn, write=False)

    def verify_annotator(self, name: str, password: str) -> Annotator | None:
        """The annotator when ``password`` matches (constant-time), else None."""
        row = self._tx(lambda c: c.execute(sa.select(S.annotators)
                                           .where(S.annotators.c.name == name)).first(),
                       write=False)
        ok = verify_password(password, row.password_hash if row else None)
        return Annotator(row.id, row.name, row.role, row.kind, row.created_at,
                         bool(row.paused)) if ok else None

    def set_password(self, name: str, password: str) -> None:
        self._update_annotator(name, password_hash=hash_password(password))

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self._update_annotator(name, role=role)

    def set_paused(self, name: str, paused: bool) -> None:
        """A paused annotator keeps their account and labels but gets no pairs (app)."""
        self._update_annotator(name, paused=bool(paused))

    def _update_annotator(self, name: str, **values) -> None:
        n = self._tx(lambda c: c.execute(S.annotators.update()
                                         .where(S.annotators.c.name == name)
                                         .values(**values)).rowcount)
        if not n:
            raise NotFound(f"no annotator named {name!r}")

    # ----------------------------------------------------------- login throttle (v3)
    def login_counts(self, keys: Iterable[tuple[str, str]] | None = None) -> dict:
        """The app's failed-login counts: ``{(kind, key): (failures, last, until)}`` for ``keys`` (all if None)."""
        t = S.login_failures

        def fn(conn):
            q = sa.select(t)
            if keys is not None:
                q = q.where(sa.tuple_(t.c.kind, t.c.key).in_(list(keys)))
            return {(r.kind, r.key): (r.failures, r.last_at, r.until_at) for r in conn.execute(q)}
        return self._tx(fn, write=False)

    def update_login_count(self, kind: str, key: str, fn: Callable) -> tuple:
        """Change one count atomically, however many app processes share the store: ``fn(old) -> new``, each
        ``(failures, last, until)`` or None (none / delete). Returns ``(old, new)``."""
        t = S.login_failures
        where = (t.c.kind == kind) & (t.c.key == key)

        def tx(conn):
            # a row to lock, so that two first failures at once count two (PostgreSQL; SQLite's writer is alone)
            _insert_ignore(conn, t, [{"kind": kind, "key": key, "failures": 0, "last_at": 0.0, "until_at": 0.0}])
            r = conn.execute(sa.select(t).where(where).with_for_update()).first()
            old = (r.failures, r.last_at, r.until_at) if r.failures else None
            new = fn(old)
            if new is None:
                conn.execute(t.delete().where(where))
            else:
                conn.execute(t.update().where(where).values(failures=new[0], last_at=new[1], until_at=new[2]))
            return old, new
        return self._tx(tx)

    # ---------------------------------------------------- prompts, responses, comparisons
    def add_prompt(self, prompt: str | Sequence[dict], source: str | None = None,
                   tags: Sequence[str] | None = None) -> int:
        """Prompt id (text or chat messages); deduplicated on the content hash of its messages."""
        msgs = _check_messages(_as_prompt(prompt), "prompt", self.max_text_bytes)
        h = content_hash(msgs)
        row = {"content_hash": h, "messages": msgs, "source": source,
               "tags": list(tags) if tags else None, "created_at": S.utcnow()}

        def fn(conn):
            _insert_ignore(conn, S.prompts, [row])
            return conn.execute(sa.select(S.prompts.c.id)
                                .where(S.prompts.c.content_hash == h)).scalar_one()
        return self._tx(fn)

    def get_prompt(self, prompt_id: int) -> dict:
        row = self._tx(lambda c: c.execute(sa.select(S.prompts)
                                           .where(S.prompts.c.id == prompt_id)).first(),
                       write=False)
        if row is None:
            raise NotFound(f"no prompt {prompt_id}")
        return {"id": row.id, "messages": row.messages, "source": row.source, "tags": row.tags,
                "created_at": row.created_at}

    def add_response(self, prompt_id: int, response: str | Sequence[dict], model: str = "",
                     settings: dict | None = None) -> int:
        """Response id; deduplicated on (prompt, text, model)."""
        msgs = _check_messages(_as_completion(response), "response", self.max_text_bytes)
        cols = _completion_cols(msgs)
        row = {"prompt_id": prompt_id, "model": model or "", "settings": settings,
               "created_at": S.utcnow(), **cols}

        def fn(conn):
            try:
                _insert_ignore(conn, S.responses, [row])
            except sa.exc.IntegrityError:
                raise NotFound(f"no prompt {prompt_id}") from None
            rid = conn.execute(sa.select(S.responses.c.id).where(
                S.responses.c.prompt_id == prompt_id,
                S.responses.c.content_hash == cols["content_hash"],
                S.responses.c.model == (model or ""))).scalar()
            if rid is None:
                raise NotFound(f"no prompt {prompt_id}")
            return rid
        return self._tx(fn)

    def add_candidates(self, prompt: str | Sequence[dict] | int, a: str, b: str, *, model_a: str = "",
                       model_b: str | None = None, settings: dict | None = None, priority: float | None = 0.0,
                       source: str | None = None) -> int | None:
        """Two generated replies to a prompt (text, messages or a prompt id) as a comparison to label: the id,
        or None when they are the same text (nothing to compare). Generated text is made storable first
        (``storable``), so a model that emits NUL or a lone surrogate cannot stop a run."""
        a, b = storable(a), storable(b)
        model_b = model_a if model_b is None else model_b
        if model_a == model_b and a.strip() == b.strip():
            return None
        pid = prompt if isinstance(prompt, int) else self.add_prompt(prompt, source=source)
        ra = self.add_response(pid, a, model=model_a, settings=settings)
        rb = self.add_response(pid, b, model=model_b, settings=settings)
        return self.add_comparison(pid, ra, rb, priority=priority, source=source)

    def add_comparison(self, prompt_id: int, response_a_id: int, response_b_id: int,
                       priority: float | None = 0.0, source: str | None = None, *,
                       allow_same: bool = False) -> int:
        """Comparison id. ``priority`` orders the annotation queue (higher first); ``None`` keeps
        it out of the queue. An existing comparison of the same two responses (either order) is
        returned as is."""
        if response_a_id == response_b_id and not allow_same:
            raise ValueError("a comparison needs two different responses")

        def fn(conn):
            got = conn.execute(sa.select(S.responses.c.id, S.responses.c.prompt_id)
                               .where(S.responses.c.id.in_([response_a_id, response_b_id]))).all()
            owners = {r.id: r.prompt_id for r in got}
            for rid in (response_a_id, response_b_id):
                if rid not in owners:
                    raise NotFound(f"no response {rid}")
                if owners[rid] != prompt_id:
                    raise ValueError(f"response {rid} belongs to prompt {owners[rid]}, "
                                     f"not {prompt_id}")
            existing = _find_comparison(conn, prompt_id, response_a_id, response_b_id)
            if existing is not None:
                return existing
            _insert_ignore(conn, S.comparisons, [{
                "prompt_id": prompt_id, "response_a_id": response_a_id,
                "response_b_id": response_b_id, "priority": priority, "source": source,
                "created_at": S.utcnow()}])
            return _find_comparison(conn, prompt_id, response_a_id, response_b_id)
        return self._tx(fn)

    def set_priority(self, comparison_id: int, priority: float | None) -> None:
        self._tx(lambda c: c.execute(S.comparisons.update()
                                     .where(S.comparisons.c.id == comparison_id)
                                     .values(priority=priority)))

    def get_comparison(self, comparison_id: int) -> Comparison:
        c = self._tx(lambda conn: _load_comparison(conn, comparison_id), write=False)
        if c is None:
            raise NotFound(f"no comparison {comparison_id}")
        return c

    def add_pair(self, prompt: str | Sequence[dict], chosen: str | Sequence[dict],
                 rejected: str | Sequence[dict], labeller: str = "dataset",
                 source: str | None = None, *, labeller_kind: str = "rule",
                 chosen_model: str = "", rejected_model: str = "",
                 priority: float | None = None) -> int:
        """Store a labelled pair in one transaction: prompt, two responses, a comparison and the
        label of ``labeller`` (created with ``labeller_kind`` if new). Returns the comparison id.
        Not queued for annotators unless ``priority`` is given."""
        item = {"prompt": _check_messages(_as_prompt(prompt), "prompt", self.max_text_bytes),
                "chosen": _check_messages(_as_completion(chosen, "chosen"), "chosen",
                                          self.max_text_bytes),
                "rejected": _check_messages(_as_completion(rejected, "rejected"), "rejected",
                                            self.max_text_bytes),
                "chosen_model": chosen_model, "rejected_model": rejected_model}
        lab = self.ensure_annotator(labeller, kind=labeller_kind)
        report = ImportReport(file=source or "")
        ids = self._tx(lambda conn: _ingest(conn, [item], source, lab.id, priority, report))
        return ids[0]

    # ----------------------------------------------------------------------------- labels
    def submit_label(self, comparison_id: int, annotator: str | int, choice: str, *,
                     left: str | None = None, rationale: str | None = None,
                     confidence: float | None = None, seconds: float | None = None,
                     request_id: str | None = None, replace: bool = False) -> Label:
        """Store one label and return it (committed when this returns).

        - ``choice``: 'a' | 'b' | 'tie' | 'both_bad' | 'skip' — always about response A/B of the
          comparison, whichever side was shown on the ``left`` ('a' | 'b', for bias stats).
        - ``request_id``: a client id; resubmitting it returns the stored label, changes nothing.
        - ``confidence``: how sure the labeller is, 0 (a coin flip) to 1 (certain; the default): the label is
          right with probability (1 + confidence) / 2. The app's low / medium / high are 1/3, 2/3, 1; a gold
          reward model's is |2 sigmoid(r_a - r_b) - 1|. A soft export (``soft=True``) turns it into ``p_chosen``.
        - One label per (comparison, annotator): a second submit raises ``LabelExists`` unless
          ``replace=True``, which updates only this annotator's own label. Other annotators'
          labels are never touched.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if confidence is not None and not 0 <= confidence <= 1:
            raise ValueError(f"confidence must be in [0, 1] (0: a coin flip, 1: certain), got {confidence}")
        if left not in (None, "a", "b"):
            raise ValueError(f"left must be 'a', 'b' or None, got {left!r}")
        if rationale is not None:
            check_text(rationale, "rationale", self.max_text_bytes)
        if request_id is not None:
            check_text(request_id, "request_id", 200)
        values = {"comparison_id": comparison_id, "choice": choice, "left_side": left,
                  "rationale": rationale, "confidence": confidence, "seconds": seconds,
                  "request_id": request_id}
        if self._batcher is not None and isinstance(annotator, str):
            aid = self._annotator_ids.get(annotator) or self._tx(lambda c: self._aid(c, annotator), write=False)
            now = S.utcnow()
            new_id = self._batcher.insert({**values, "annotator_id": aid, "created_at": now})
            if new_id is not None:
                return Label(new_id, comparison_id, annotator, choice, left, rationale, confidence,
                             seconds, request_id, now, aid)
            # not inserted (a resubmit, a second label, no such comparison): the one-label path below says why

        def fn(conn):
            aid = self._aid(conn, annotator)
            now = S.utcnow()
            row = {**values, "annotator_id": aid, "created_at": now}
            try:  # happy path: one statement
                new_id = _insert_ignore(conn, S.labels, [row], returning=S.labels.c.id)
            except sa.exc.IntegrityError as e:  # foreign key: no such comparison
                raise NotFound(f"no comparison {comparison_id} ({e.orig})") from None
            if new_id is not None:
                name = annotator if isinstance(annotator, str) else conn.execute(
                    sa.select(S.annotators.c.name).where(S.annotators.c.id == aid)).scalar()
                return Label(new_id, comparison_id, name, choice, left, rationale, confidence,
                             seconds, request_id, now, aid)
            if request_id is not None:  # a resubmit: return what is stored, change nothing
                got = _label_by(conn, S.labels.c.request_id == request_id)
                if got is not None:
                    return _same_request(got, aid, comparison_id, request_id)
            own = _label_by(conn, (S.labels.c.comparison_id == comparison_id)
                            & (S.labels.c.annotator_id == aid))
            if own is None:  # pragma: no cover - conflict on a constraint we don't know
                raise StoreError(f"label for comparison {comparison_id} was not stored")
            if not replace:
                raise LabelExists(f"{own.annotator!r} already labelled comparison "
                                  f"{comparison_id} ({own.choice!r}, label {own.id}); pass "
                                  "replace=True to change it, or undo_last()")
            conn.execute(S.labels.update().where(S.labels.c.id == own.id)
                         .values(**{k: v for k, v in values.items() if k != "comparison_id"},
                                 created_at=now))
            return _label_by(conn, S.labels.c.id == own.id)
        return self._tx(fn)

    def undo_last(self, annotator: str | int) -> Label | None:
        """Delete this annotator's most recent label and return it (None if they have none)."""
        def fn(conn):
            aid = self._aid(conn, annotator)
            last = _label_by(conn, S.labels.c.annotator_id == aid, last=True)
            if last is not None:
                conn.execute(S.labels.delete().where(S.labels.c.id == last.id))
            return last
        return self._tx(fn)

    def labels(self, comparison_id: int | None = None, annotator: str | None = None
               ) -> list[Label]:
        def fn(conn):
            q = _label_select()
            if comparison_id is not None:
                q = q.where(S.labels.c.comparison_id == comparison_id)
            if annotator is not None:
                q = q.where(S.labels.c.annotator_id == self._aid(conn, annotator))
            return [_label_row(r) for r in conn.execute(q.order_by(S.labels.c.id))]
        return self._tx(fn, write=False)

    # ---------------------------------------------------------------------- gold, re-asks
    def set_gold(self, comparison_id: int, answer: str | None, source: str | None = None) -> None:
        """Mark a comparison as a known-answer (gold) pair (``answer`` 'a' | 'b' | 'tie' |
        'both_bad', about responses A/B), or unmark it with ``answer=None``. Gold pairs leave the
        normal queue; the app mixes them into every annotator's queue (``next_gold``)."""
        if answer is not None and answer not in CHOICES[:4]:
            raise ValueError(f"gold answer must be one of {CHOICES[:4]} or None, got {answer!r}")

        def fn(conn):
            if conn.execute(sa.select(S.comparisons.c.id)
                            .where(S.comparisons.c.id == comparison_id)).first() is None:
                raise NotFound(f"no comparison {comparison_id}")
            conn.execute(S.gold.delete().where(S.gold.c.comparison_id == comparison_id))
            if answer is not None:
                conn.execute(S.gold.insert().values(comparison_id=comparison_id, answer=answer,
                                                    source=source, created_at=S.utcnow()))
        self._tx(fn)

    def gold(self) -> dict[int, str]:
        """comparison id -> known answer."""
        return dict(self._tx(lambda c: c.execute(sa.select(S.gold.c.comparison_id, S.gold.c.answer))
                             .all(), write=False))

    def import_gold(self, path: str | os.PathLike, *, source: str | None = None) -> int:
        """A preference file's pairs as gold pairs (the file's chosen response is the answer);
        returns how many. Bad records raise ``DataError`` naming file and line; nothing is stored."""
        path = Path(path)
        items = []
        for key, rec in read_records(path):
            where = location(path, key)
            pref = to_preference(rec, where)
            for k in ("prompt", "chosen", "rejected"):
                _check_messages(pref[k], f"{where}: field '{k}'", self.max_text_bytes)
            items.append(pref)
        lab = self.ensure_annotator("gold", kind="rule")
        src = source or path.name

        def fn(conn):
            cids = _ingest(conn, items, src, lab.id, None, ImportReport(file=str(path)))
            answers = dict(conn.execute(sa.select(S.labels.c.comparison_id, S.labels.c.choice).where(
                S.labels.c.annotator_id == lab.id, S.labels.c.comparison_id.in_(set(cids)))).all())
            conn.execute(S.gold.delete().where(S.gold.c.comparison_id.in_(set(cids))))
            _insert_ignore(conn, S.gold, [{"comparison_id": cid, "answer": answers[cid], "source": src,
                                           "created_at": S.utcnow()} for cid in dict.fromkeys(cids)])
            return len(set(cids))
        return self._tx(fn)

    def next_gold(self, annotator: str | int, rng: random.Random | None = None) -> Comparison | None:
        """A random gold pair ``annotator`` has not labelled yet (None when none is left)."""
        def fn(conn):
            aid = self._aid(conn, annotator)
            mine = sa.exists().where(S.labels.c.comparison_id == S.gold.c.comparison_id,
                                     S.labels.c.annotator_id == aid)
            cids = conn.execute(sa.select(S.gold.c.comparison_id).where(~mine)).scalars().all()
            return _load_comparison(conn, (rng or random).choice(cids)) if cids else None
        return self._tx(fn, write=False)

    def next_reask(self, annotator: str | int, min_gap: int = 5,
                   rng: random.Random | None = None) -> Label | None:
        """One of ``annotator``'s decisive labels (a/b, side known) not asked again yet and at
        least ``min_gap`` labels old: the app shows that pair again with the sides swapped."""
        def fn(conn):
            aid = self._aid(conn, annotator)
            L = S.labels
            recent = (sa.select(L.c.id).where(L.c.annotator_id == aid).order_by(L.c.id.desc())
                      .limit(1).offset(min_gap).scalar_subquery())
            asked = sa.exists().where(S.reasks.c.label_id == L.c.id)
            ids = conn.execute(sa.select(L.c.id).where(
                L.c.annotator_id == aid, L.c.choice.in_(DECISIVE), L.c.left_side.is_not(None),
                L.c.id <= recent, ~asked)).scalars().all()
            return _label_by(conn, L.c.id == (rng or random).choice(ids)) if ids else None
        return self._tx(fn, write=False)

    def submit_reask(self, label_id: int, choice: str, *, left: str | None = None,
                     seconds: float | None = None, request_id: str | None = None) -> int:
        """Store the answer to a re-ask of label ``label_id`` (same annotator, same pair; ``choice``
        about responses A/B). Idempotent on ``request_id``; one re-ask per label. Returns its id."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if left not in (None, "a", "b"):
            raise ValueError(f"left must be 'a', 'b' or None, got {left!r}")

        def fn(conn):
            orig = _label_by(conn, S.labels.c.id == label_id)
            if orig is None:
                raise NotFound(f"no label {label_id} (undone meanwhile?)")
            R = S.reasks.c
            same = R.label_id == label_id
            if request_id is not None:
                same = same | (R.request_id == request_id)
            got = conn.execute(sa.select(R.id).where(same)).scalar()
            if got is not None:
                return got
            return conn.execute(S.reasks.insert().values(
                label_id=label_id, annotator_id=orig.annotator_id, comparison_id=orig.comparison_id,
                choice=choice, left_side=left, seconds=seconds, request_id=request_id,
                created_at=S.utcnow()).returning(R.id)).scalar()
        return self._tx(fn)

    def delete_reask(self, reask_id: int) -> None:
        self._tx(lambda c: c.execute(S.reasks.delete().where(S.reasks.c.id == reask_id)))

    def reasks(self) -> list[dict]:
        """Every re-ask beside the label it repeats."""
        R, L, A = S.reasks, S.labels, S.annotators
        q = (sa.select(R.c.id, R.c.label_id, R.c.comparison_id, R.c.choice, R.c.left_side,
                       L.c.choice.label("first_choice"), L.c.left_side.label("first_left"),
                       A.c.name.label("annotator"))
             .join(L, L.c.id == R.c.label_id).join(A, A.c.id == R.c.annotator_id).order_by(R.c.id))
        return [dict(r._mapping) for r in self._tx(lambda c: c.execute(q).all(), write=False)]

    # ------------------------------------------------------------------------------ queue
    def _queue_filter(self, aid: int, overlap: int):
        c, lm, an = S.comparisons, S.labels.alias("l_me"), S.annotators
        lh = S.labels.alias("l_h")
        mine = sa.exists().where(lm.c.comparison_id == c.c.id, lm.c.annotator_id == aid)
        humans = (sa.select(sa.func.count()).select_from(lh.join(an, an.c.id == lh.c.annotator_id))
                  .where(lh.c.comparison_id == c.c.id, lh.c.choice != "skip",
                         an.c.kind == "human").scalar_subquery())
        gold = sa.exists().where(S.gold.c.comparison_id == c.c.id)  # served apart (next_gold)
        return sa.and_(c.c.priority.is_not(None), ~mine, humans < overlap, ~gold)

    def next_comparison(self, annotator: str | int, overlap: int = 1) -> Comparison | None:
        """The next comparison for ``annotator``: queued (priority not NULL), not yet labelled by
        them, with fewer than ``overlap`` non-skip human labels; highest priority, then lowest id.
        No reservation: two annotators may get the same last slot; both labels are kept."""
        def fn(conn):
            aid = self._aid(conn, annotator)
            cid = conn.execute(self._queue_stmts()[0], {"aid": aid, "overlap": overlap}).scalar()
            return None if cid is None else _load_comparison(conn, cid)
        return self._tx(fn, write=False)

    def _queue_stmts(self):
        """(next id, open count) statements with ``aid`` / ``overlap`` bind parameters, built once:
        building the correlated subqueries anew cost ~4 ms per click."""
        if self._queue_cache is None:
            flt = self._queue_filter(sa.bindparam("aid"), sa.bindparam("overlap"))
            c = S.comparisons.c
            self._queue_cache = (
                sa.select(c.id).where(flt).order_by(c.priority.desc(), c.id).limit(1),
                sa.select(sa.func.count()).select_from(S.comparisons).where(flt))
        return self._queue_cache

    def progress(self, annotator: str | int, overlap: int = 1) -> dict:
        """``{"done": labels by annotator, "remaining": queue left for them, "assigned": sum}``."""
        def fn(conn):
            aid = self._aid(conn, annotator)
            done = conn.execute(sa.select(sa.func.count())
                                .where(S.labels.c.annotator_id == aid)).scalar()
            left = conn.execute(self._queue_stmts()[1], {"aid": aid, "overlap": overlap}).scalar()
            return {"done": done, "remaining": left, "assigned": done + left}
        return self._tx(fn, write=False)

    # ----------------------------------------------------------------------------- import
    def import_file(self, path: str | os.PathLike, *, source: str | None = None,
                    labeller: str = "dataset", skip_bad: bool = False,
                    max_text_bytes: int | None = None, limit: int | None = None,
                    priority: float | None = None) -> ImportReport:
        """Import a preference file in ONE transaction (see docs/store.md for formats).

        A bad record raises ``DataError`` naming file, line and field, and nothing from the file
        is stored — unless ``skip_bad``, which stores the rest and lists the skipped records in
        the report. Labels are by ``labeller`` (a 'rule' annotator, created if missing)."""
        t0 = time.perf_counter()
        path = Path(path)
        limit_bytes = max_text_bytes or self.max_text_bytes
        report = ImportReport(file=str(path))
        items = []
        for key, rec in read_records(path):
            if limit is not None and report.records >= limit:
                break
            report.records += 1
            where = location(path, key)
            try:
                pref = to_preference(rec, where)
                for k in ("prompt", "chosen", "rejected"):
                    _check_messages(pref[k], f"{where}: field '{k}'", limit_bytes)
                for k in ("chosen_model", "rejected_model"):
                    if k in pref:
                        check_text(pref[k], f"{where}: field '{k}'", 300)
            except DataError as e:
                if not skip_bad:
                    raise
                report.skipped.append((where, str(e)))
                continue
            items.append(pref)
        lab = self.ensure_annotator(labeller, kind="rule")
        src = source or path.name

        def fn(conn):
            r = ImportReport(file=str(path))  # fresh counters on each retry
            _ingest(conn, items, src, lab.id, priority, r)
            return r
        r = self._tx(fn)
        for k in ("pairs", "new_prompts", "new_responses", "new_comparisons", "new_labels",
                  "duplicates", "conflicts"):
            setattr(report, k, getattr(r, k))
        report.seconds = time.perf_counter() - t0
        return report

    def import_pairs(self, items: Iterable[dict], *, source: str | None = None,
                     labeller: str = "dataset", labeller_kind: str = "rule",
                     priority: float | None = None) -> ImportReport:
        """Bulk-store ``{"prompt", "chosen", "rejected"}`` items (strings or message lists) in
        one transaction."""
        norm = []
        for i, it in enumerate(items):
            where = f"item {i}"
            norm.append({
                "prompt": _check_messages(_as_prompt(it["prompt"], where), f"{where}.prompt",
                                          self.max_text_bytes),
                "chosen": _check_messages(_as_completion(it["chosen"], where), f"{where}.chosen",
                                          self.max_text_bytes),
                "rejected": _check_messages(_as_completion(it["rejected"], where),
                                            f"{where}.rejected", self.max_text_bytes),
                "chosen_model": it.get("chosen_model", ""),
                "rejected_model": it.get("rejected_model", "")})
        lab = self.ensure_annotator(labeller, kind=labeller_kind)
        t0 = time.perf_counter()

        def fn(conn):
            r = ImportReport(file=source or "", records=len(norm))
            _ingest(conn, norm, source, lab.id, priority, r)
            return r
        r = self._tx(fn)
        r.seconds = time.perf_counter() - t0
        return r

    # ----------------------------------------------------------------------------- export
    def export_rows(self, *, format: str = "conversational", unpaired: bool = False,
                    min_labels: int = 1, min_agreement: float = 0.0, test_fraction: float = 0.0,
                    seed: str = "", kinds: Sequence[str] | None = None,
                    annotators: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                    comparison_ids: Sequence[int] | None = None, both_bad: str = "drop",
                    with_meta: bool = False, aggregate: str = "majority",
                    soft: bool = False) -> tuple[dict, dict]:
        """``({"train": rows, "test": rows}, report)``; see ``export``."""
        from align.store.exporting import export_rows
        self._ensure()
        return export_rows(self, format=format, unpaired=unpaired, min_labels=min_labels,
                           min_agreement=min_agreement, test_fraction=test_fraction, seed=seed,
                           kinds=kinds, annotators=annotators, sources=sources,
                           comparison_ids=comparison_ids, both_bad=both_bad, with_meta=with_meta,
                           aggregate=aggregate, soft=soft)

    def export(self, path: str | os.PathLike | None = None, **options) -> Any:
        """Export labelled pairs in TRL's preference format.

        Aggregation: per comparison, majority vote over the non-skip labels of the selected
        labellers (``kinds`` e.g. ['human'], ``annotators`` names; default all), of the comparisons
        from ``sources`` and/or with ids in ``comparison_ids`` (default all). Dropped: fewer
        than ``min_labels`` votes, no strict majority, winner share < ``min_agreement``, and
        winners 'tie' / 'both_bad' (``both_bad='negatives'`` keeps both as KTO negatives when
        ``unpaired``). A label 'a' means response A is better, whichever side was shown left.
        ``format``: 'conversational' (message lists, default) or 'standard' (strings).
        ``aggregate='reliability'``: instead of the majority, weigh each annotator by their accuracy
        estimated with a one-coin Dawid–Skene model (``align.store.reliability``; gold pairs
        anchor it). ``soft``: add ``p_chosen`` (probability that chosen beats rejected: the mean over
        the a/b labels of each one's, (1 ± confidence) / 2) and ``weight`` (|2·p_chosen − 1|) to paired rows.
        ``unpaired``: KTO rows ``{prompt, completion, label}``. ``test_fraction``: deterministic
        split on the prompt's hash (a prompt never lands in both splits).

        ``path`` None: a ``datasets.Dataset`` (a ``DatasetDict`` train/test with a split).
        ``path`` 'x.jsonl': writes x.jsonl (or x.train.jsonl + x.test.jsonl); returns the counts.
        """
        splits, report = self.export_rows(**options)
        split = options.get("test_fraction", 0.0) > 0
        if path is None:
            import datasets  # lazy: heavy import
            if not split:
                return datasets.Dataset.from_list(splits["train"])
            return datasets.DatasetDict({k: datasets.Dataset.from_list(v)
                                         for k, v in splits.items()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, rows in splits.items():
            if not split and name != "train":
                continue
            p = path if not split else path.with_name(
                path.name.removesuffix(".jsonl") + f".{name}.jsonl")
            tmp = p.with_name(p.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, p)
            counts[str(p)] = len(rows)
        return {"files": counts, **report}

    # ------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Counts, labels per annotator, agreement (Cohen per pair, Fleiss, Krippendorff),
        position bias and seconds per label, as a JSON-able dict."""
        from align.store.stats import compute_stats
        self._ensure()
        return compute_stats(self)

    def annotator_quality(self) -> list[dict]:
        """Per-annotator speed, gold accuracy, self-consistency, agreement and position bias
        (``align.store.stats.annotator_quality``)."""
        from align.store.stats import annotator_quality
        self._ensure()
        return annotator_quality(self)


class _LabelBatcher:
    """Group commit within one process (``Store(batch_labels=True)``, the app's store): its threads hand their
    label INSERTs to one writer thread, which runs whatever is waiting (up to ``max_batch``) in one
    transaction -- one BEGIN, one COMMIT, one fsync -- and wakes each caller after that commit is on disk.
    An INSERT that did not store its row (a resubmit, a second label) returns None and its caller takes the
    one-label path; if the transaction fails (no such comparison), every caller of the batch does."""

    max_batch = 256

    def __init__(self, store: "Store"):
        self.store = store
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = None  # the writer thread's process (a forked child starts its own)
        self.lock = threading.Lock()

    def insert(self, row: dict) -> int | None:
        with self.lock:
            if self.pid != os.getpid():
                self.pid = os.getpid()
                threading.Thread(target=self._run, name="align-label-writer", daemon=True).start()
        done = [threading.Event(), None]
        self.q.put((row, done))
        done[0].wait()
        return done[1]

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                ids = self.store._tx(lambda conn, batch=batch: [
                    _insert_ignore(conn, S.labels, [row], returning=S.labels.c.id) for row, _ in batch])
            except Exception:  # any: the callers redo their labels one by one, and see the error there
                ids = [None] * len(batch)
            for (_, done), new_id in zip(batch, ids):
                done[1] = new_id
                done[0].set()


# ------------------------------------------------------------------------------- module helpers
def _sqlite_setup(engine: sa.Engine, busy_timeout_ms: int, synchronous: str, autocheckpoint: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        for _ in range(50):
            try:
                if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:  # locked while another process switches it
                time.sleep(0.05)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        if not autocheckpoint:  # not inside a COMMIT under the write lock: the store runs them (_tx)
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # Writers take the write lock up front: no deadlock-prone lock upgrades, and
        # busy_timeout applies to the wait.
        write = conn.get_execution_options().get("align_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


_STMTS: dict = {}


def _insert_ignore(conn: sa.Connection, table: sa.Table, rows: list[dict], returning=None):
    """INSERT rows, skipping any that violate a unique constraint. With ``returning`` (one row
    only) returns the new row's column value or None if it already existed."""
    if not rows:
        return None
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        key = (name, table.name, returning is not None)
        stmt = _STMTS.get(key)
        if stmt is None:
            stmt = insert(table).on_conflict_do_nothing()
            if returning is not None:
                stmt = stmt.returning(returning)
            _STMTS[key] = stmt
        if returning is not None:
            return conn.execute(stmt, rows[0]).scalar()
        conn.execute(stmt, rows)
        return None
    out = None  # other databases: one savepoint per row
    for row in rows:
        try:
            with conn.begin_nested():
                res = conn.execute(table.insert().values(**row))
                out = res.inserted_primary_key[0] if returning is not None else None
        except sa.exc.IntegrityError as e:
            if "foreign" in str(e.orig).lower():
                raise
    return out


def _find_comparison(conn, prompt_id: int, a: int, b: int) -> int | None:
    c = S.comparisons.c
    return conn.execute(sa.select(c.id).where(
        c.prompt_id == prompt_id,
        sa.or_(sa.and_(c.response_a_id == a, c.response_b_id == b),
               sa.and_(c.response_a_id == b, c.response_b_id == a)))
        .order_by(c.id).limit(1)).scalar()


def _label_select():
    return (sa.select(S.labels, S.annotators.c.name.label("annotator_name"))
            .join(S.annotators, S.annotators.c.id == S.labels.c.annotator_id))


def _label_row(r) -> Label:
    return Label(r.id, r.comparison_id, r.annotator_name, r.choice, r.left_side, r.rationale,
                 r.confidence, r.seconds, r.request_id, r.created_at, r.annotator_id)


def _label_by(conn, where, last: bool = False) -> Label | None:
    q = _label_select().where(where)
    q = q.order_by(S.labels.c.id.desc()).limit(1) if last else q
    r = conn.execute(q).first()
    return None if r is None else _label_row(r)


def _same_request(got: Label, aid: int, comparison_id: int, request_id: str) -> Label:
    if got.annotator_id != aid or got.comparison_id != comparison_id:
        raise RequestIdConflict(f"request id {request_id!r} belongs to {got.annotator!r}'s label "
                                f"on comparison {got.comparison_id}")
    return got


def _load_comparison(conn, cid: int) -> Comparison | None:
    c, p = S.comparisons, S.prompts
    ra, rb = S.responses.alias("ra"), S.responses.alias("rb")
    r = conn.execute(
        sa.select(c, p.c.messages.label("pm"), ra.c.text.label("ta"), ra.c.messages.label("ma"),
                  ra.c.model.label("model_a"), rb.c.text.label("tb"), rb.c.messages.label("mb"),
                  rb.c.model.label("model_b"))
        .join(p, p.c.id == c.c.prompt_id).join(ra, ra.c.id == c.c.response_a_id)
        .join(rb, rb.c.id == c.c.response_b_id).where(c.c.id == cid)).first()
    if r is None:
        return None
    return Comparison(r.id, r.prompt_id, r.pm, r.response_a_id, r.response_b_id,
                      _completion_of(r.ta, r.ma), _completion_of(r.tb, r.mb), r.model_a,
                      r.model_b, r.priority, r.source)


def _chunks(seq: list, n: int = _CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _ingest(conn: sa.Connection, items: list[dict], source: str | None, labeller_id: int,
            priority: float | None, report: ImportReport) -> list[int]:
    """Store normalised pairs in bulk inside the caller's transaction; returns comparison ids
    (one per item). Deduplicates prompts, responses, comparisons (either order) and labels."""
    out: list[int] = []
    now = S.utcnow()
    for n, chunk in enumerate(_chunks(items)):
        if n and n % 10 == 0 and conn.dialect.name == "postgresql":
            # The tables grow inside this one transaction, where autovacuum cannot see them;
            # refresh the planner's row counts (ANALYZE counts our own uncommitted rows) or the
            # lookups below turn into sequential scans and a big import goes quadratic.
            conn.execute(sa.text("analyze prompts, responses, comparisons, labels"))
        # 1. prompts
        ph = [content_hash(it["prompt"]) for it in chunk]
        pid = dict(conn.execute(sa.select(S.prompts.c.content_hash, S.prompts.c.id)
                                .where(S.prompts.c.content_hash.in_(set(ph)))).all())
        new = {}
        for h, it in zip(ph, chunk):
            if h not in pid and h not in new:
                new[h] = {"content_hash": h, "messages": it["prompt"], "source": source,
                          "tags": None, "created_at": now}
        if new:
            _insert_ignore(conn, S.prompts, list(new.values()))
            report.new_prompts += len(new)
            pid.update(conn.execute(sa.select(S.prompts.c.content_hash, S.prompts.c.id)
                                    .where(S.prompts.c.content_hash.in_(list(new)))).all())
        # 2. responses
        want = []  # per item: (chosen key, rejected key)
        rows = {}
        for h, it in zip(ph, chunk):
            keys = []
            for side in ("chosen", "rejected"):
                cols = _completion_cols(it[side])
                k = (pid[h], cols["content_hash"], it.get(f"{side}_model") or "")
                keys.append(k)
                rows.setdefault(k, {"prompt_id": k[0], "model": k[2], "settings": None,
                                    "created_at": now, **cols})
            want.append(keys)
        pids = sorted({k[0] for k in rows})
        r = S.responses.c

        def load_resp(r=r, pids=pids, rows=rows):
            return {(x.prompt_id, x.content_hash, x.model): x.id for x in conn.execute(
                sa.select(r.id, r.prompt_id, r.content_hash, r.model)
                .where(r.prompt_id.in_(pids), r.content_hash.in_({k[1] for k in rows})))}
        rid = load_resp()
        missing = [v for k, v in rows.items() if k not in rid]
        if missing:
            _insert_ignore(conn, S.responses, missing)
            report.new_responses += len(missing)
            rid = load_resp()
        # 3. comparisons (either orientation); A/B order of new ones is a hash coin flip
        c = S.comparisons.c

        def load_comp(c=c, pids=pids):
            got = {}
            for x in conn.execute(sa.select(c.id, c.prompt_id, c.response_a_id, c.response_b_id)
                                  .where(c.prompt_id.in_(pids)).order_by(c.id)):
                key = (x.prompt_id, min(x.response_a_id, x.response_b_id),
                       max(x.response_a_id, x.response_b_id))
                got.setdefault(key, (x.id, x.response_a_id))
            return got
        comp = load_comp()
        new_c = {}
        pairs = []
        for keys in want:
            ch, rj = rid[keys[0]], rid[keys[1]]
            key = (keys[0][0], min(ch, rj), max(ch, rj))
            pairs.append((key, ch, rj))
            if key not in comp and key not in new_c:
                flip = int(hashlib.sha256(f"{ch}:{rj}".encode()).hexdigest()[:2], 16) & 1
                a, b = (rj, ch) if flip else (ch, rj)
                new_c[key] = {"prompt_id": key[0], "response_a_id": a, "response_b_id": b,
                              "priority": priority, "source": source, "created_at": now}
        if new_c:
            _insert_ignore(conn, S.comparisons, list(new_c.values()))
            report.new_comparisons += len(new_c)
            comp = load_comp()
        # 4. labels of the labeller
        cids = sorted({comp[p[0]][0] for p in pairs})
        have = dict(conn.execute(sa.select(S.labels.c.comparison_id, S.labels.c.choice).where(
            S.labels.c.annotator_id == labeller_id, S.labels.c.comparison_id.in_(cids))).all())
        new_l = {}
        for key, ch, _rj in pairs:
            cid, a = comp[key]
            choice = "a" if a == ch else "b"  # chosen == rejected (2 HH records): 'a', a == b
            out.append(cid)
            report.pairs += 1
            prev = have.get(cid, new_l.get(cid, {}).get("choice"))
            if prev is None:
                new_l[cid] = {"comparison_id": cid, "annotator_id": labeller_id,
                              "choice": choice, "left_side": None, "created_at": now}
            elif prev == choice:
                report.duplicates += 1
            else:
                report.conflicts += 1
        if new_l:
            _insert_ignore(conn, S.labels, list(new_l.values()))
            report.new_labels += len(new_l)
    return out
