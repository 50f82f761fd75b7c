"""Tables and migrations of the preference store (SQLAlchemy Core; SQLite and PostgreSQL).

Migrations are an ordered list of ``(version, function(conn))``; ``migrate(conn)`` applies the ones
above the version recorded in ``align_schema`` inside the caller's transaction. To change the
schema: append a function (never edit an applied one) and describe it in docs/store.md.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

metadata = sa.MetaData()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _created():
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow)


schema_version = sa.Table(
    "align_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
)

annotators = sa.Table(
    "annotators", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("role", sa.String(20), nullable=False, default="annotator"),
    sa.Column("kind", sa.String(10), nullable=False, default="human"),
    sa.Column("password_hash", sa.String(300)),
    _created(),
    sa.Column("paused", sa.Boolean, nullable=False, default=False, server_default=sa.false()),  # v2
    sa.CheckConstraint("role in ('admin', 'annotator')", name="ck_annotators_role"),
    sa.CheckConstraint("kind in ('human', 'ai', 'rule')", name="ck_annotators_kind"),
)

prompts = sa.Table(
    "prompts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False, unique=True),  # sha256 of messages
    sa.Column("messages", sa.JSON, nullable=False),  # [{"role", "content"}]
    sa.Column("source", sa.String(500)),
    sa.Column("tags", sa.JSON),  # list of strings
    _created(),
)

responses = sa.Table(
    "responses", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    # Only for completions that are not one assistant message (e.g. HH turns after a split).
    sa.Column("messages", sa.JSON),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("model", sa.String(300), nullable=False, default=""),  # "" = unknown
    sa.Column("settings", sa.JSON),  # generation settings
    _created(),
    sa.UniqueConstraint("prompt_id", "content_hash", "model", name="uq_responses_dedup"),
)

comparisons = sa.Table(
    "comparisons", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("response_a_id", sa.Integer, sa.ForeignKey("responses.id"), nullable=False),
    sa.Column("response_b_id", sa.Integer, sa.ForeignKey("responses.id"), nullable=False),
    sa.Column("priority", sa.Float),  # NULL = not queued for annotators (imported pairs)
    sa.Column("source", sa.String(500)),
    _created(),
    sa.UniqueConstraint("prompt_id", "response_a_id", "response_b_id", name="uq_comparisons_pair"),
    sa.Index("ix_comparisons_queue", "priority", "id"),
)
# v2: the queue's order (priority desc, id), so "the next pair" walks the index and stops at the first
# open one instead of sorting every queued comparison on each click.
ix_comparisons_next = sa.Index("ix_comparisons_next", comparisons.c.priority.desc(), comparisons.c.id)

labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
    sa.Column("choice", sa.String(10), nullable=False),
    sa.Column("left_side", sa.String(1)),  # which response was shown on the left: 'a' | 'b'
    sa.Column("rationale", sa.Text),
    sa.Column("confidence", sa.Float),
    sa.Column("seconds", sa.Float),
    sa.Column("request_id", sa.String(200), unique=True),
    _created(),
    sa.UniqueConstraint("comparison_id", "annotator_id", name="uq_labels_one_per_annotator"),
    sa.CheckConstraint("choice in ('a', 'b', 'tie', 'both_bad', 'skip')", name="ck_labels_choice"),
    sa.CheckConstraint("left_side is null or left_side in ('a', 'b')", name="ck_labels_left"),
    sa.Index("ix_labels_annotator", "annotator_id", "id"),
)

# v2: known-answer (gold) pairs and swapped re-asks, for per-annotator quality.
gold = sa.Table(
    "gold", metadata,
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id", ondelete="CASCADE"),
              primary_key=True, autoincrement=False),
    sa.Column("answer", sa.String(10), nullable=False),  # 'a' | 'b' | 'tie' | 'both_bad'
    sa.Column("source", sa.String(500)),
    _created(),
    sa.CheckConstraint("answer in ('a', 'b', 'tie', 'both_bad')", name="ck_gold_answer"),
)

reasks = sa.Table(
    "reasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # the label asked again (undoing it drops its re-asks)
    sa.Column("label_id", sa.Integer, sa.ForeignKey("labels.id", ondelete="CASCADE"), nullable=False),
    sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
    sa.Column("comparison_id", sa.Integer, sa.ForeignKey("comparisons.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("choice", sa.String(10), nullable=False),  # about responses A/B, like labels.choice
    sa.Column("left_side", sa.String(1)),
    sa.Column("seconds", sa.Float),
    sa.Column("request_id", sa.String(200), unique=True),
    _created(),
    sa.UniqueConstraint("label_id", name="uq_reasks_once"),
    sa.CheckConstraint("choice in ('a', 'b', 'tie', 'both_bad', 'skip')", name="ck_reasks_choice"),
    sa.Index("ix_reasks_annotator", "annotator_id", "id"),
)

# v3: the app's failed-login counts (app/throttle.py), so that a restart does not lift a lock-out.
login_failures = sa.Table(
    "login_failures", metadata,
    sa.Column("kind", sa.String(10), primary_key=True),  # 'account' (a casefolded name) | 'address'
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_at", sa.Float, nullable=False),  # seconds on the throttle's clock (wall time)
    sa.Column("until_at", sa.Float, nullable=False),  # no attempt before this time
)

V1_TABLES = [annotators, prompts, responses, comparisons, labels]


def _v1(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=V1_TABLES)


def _v2(conn: sa.Connection) -> None:
    """annotators.paused; tables gold and reasks; the queue-order index. A database made by v1 lacks the column (a fresh
    one gets it from v1's create_all, which uses today's table definition)."""
    if "paused" not in {c["name"] for c in sa.inspect(conn).get_columns("annotators")}:
        conn.execute(sa.text("alter table annotators add column paused boolean not null default false"))
    metadata.create_all(conn, tables=[gold, reasks])
    ix_comparisons_next.create(conn, checkfirst=True)


def _v3(conn: sa.Connection) -> None:
    """Table login_failures."""
    metadata.create_all(conn, tables=[login_failures])


MIGRATIONS: list[tuple[int, callable]] = [
    (1, _v1),
    (2, _v2),
    (3, _v3),
]
LATEST = MIGRATIONS[-1][0]


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table("align_schema"):
        return 0
    return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0


def migrate(conn: sa.Connection) -> int:
    """Apply pending migrations in the caller's transaction; returns the new version."""
    if conn.dialect.name == "postgresql":  # serialise concurrent `init`s across processes
        conn.execute(sa.text("select pg_advisory_xact_lock(7340571)"))
    schema_version.create(conn, checkfirst=True)
    version = current_version(conn)
    for v, fn in MIGRATIONS:
        if v > version:
            fn(conn)
            conn.execute(schema_version.insert().values(version=v, applied_at=utcnow()))
            version = v
    return version
