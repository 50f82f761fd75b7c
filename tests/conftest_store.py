"""Shared fixtures of the store tests (imported by tests/test_store*.py)."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("ALIGN_TEST_PG_URL")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
NO_PG = "ALIGN_TEST_PG_URL is not set (start a server with `export ALIGN_TEST_PG_URL=$(.ci/postgres.sh)`)"


def fresh_url(backend: str, tmp_path) -> tuple[str, callable]:
    """A URL to an empty database and a cleanup function."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/{uuid.uuid4().hex[:8]}.db", lambda: None
    if not PG_URL:
        pytest.skip(NO_PG)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    with eng.begin() as c:
        c.execute(sa.text(f"create schema {schema}"))
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop():
        with eng.begin() as c:
            c.execute(sa.text(f"drop schema {schema} cascade"))
        eng.dispose()
    return url.render_as_string(hide_password=False), drop


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    url, drop = fresh_url(request.param, tmp_path)
    yield url
    drop()


@pytest.fixture
def store(store_url):
    from align.store import Store

    s = Store(store_url).init()
    yield s
    s.close()


def in_threads(fn, args) -> None:
    """fn(arg) for every arg, each in its own thread, all at once; an exception in any of them fails the test."""
    args = list(args)
    with ThreadPoolExecutor(len(args)) as pool:
        list(pool.map(fn, args))
