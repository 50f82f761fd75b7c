#!/usr/bin/env bash
# Install (Debian packages) and start a throwaway PostgreSQL server for the store tests.
#
#   source .ci/postgres.sh        # exports ALIGN_TEST_PG_URL into the current shell
#   .ci/postgres.sh               # prints the URL (export it yourself)
#
# Env knobs: PGPORT (5432), PGDATA_DIR (/tmp/align-pg), PG_USER/PG_PASSWORD (align/align),
# PG_DB (align_test). Idempotent: re-running reuses a running server. Needs root (apt) or an
# already-installed PostgreSQL. Stop it with: su postgres -c "pg_ctl -D $PGDATA_DIR stop"
set -euo pipefail
PGPORT="${PGPORT:-5432}"
PGDATA_DIR="${PGDATA_DIR:-/tmp/align-pg}"
PG_USER="${PG_USER:-align}"
PG_PASSWORD="${PG_PASSWORD:-align}"
PG_DB="${PG_DB:-align_test}"

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); fi

if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
  mkdir -p "$PGDATA_DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA_DIR"
  "${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres -A trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  cat >> "$PGDATA_DIR/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
max_connections = 200
unix_socket_directories = '/tmp'
CONF
fi
if ! "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w start >/dev/null
fi
PSQL=("${RUNAS[@]}" "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${PSQL[@]}" -c "select 1 from pg_roles where rolname='$PG_USER'")" != 1 ]; then
  "${PSQL[@]}" -c "create role $PG_USER login password '$PG_PASSWORD' createdb"
fi
if [ "$("${PSQL[@]}" -c "select 1 from pg_database where datname='$PG_DB'")" != 1 ]; then
  "${PSQL[@]}" -c "create database $PG_DB owner $PG_USER encoding 'UTF8'"
fi
export ALIGN_TEST_PG_URL="postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PGPORT/$PG_DB"
echo "$ALIGN_TEST_PG_URL"
