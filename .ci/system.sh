#!/usr/bin/env bash
# Installs and starts what the browser and PostgreSQL tests need, from Debian's packages. Idempotent.
# Writes .ci/env.sh with ALIGN_TEST_PG_URL and ALIGN_CHROMIUM for the test run.
set -uo pipefail
cd "$(dirname "$0")/.."
: > .ci/env.sh
if [ "$(id -u)" != 0 ]; then echo "system: not root, browser/PostgreSQL tests will be skipped"; exit 0; fi
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "system: installing ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
    || echo "system: apt-get install failed; dependent tests will be skipped"
fi
command -v chromium >/dev/null && echo "export ALIGN_CHROMIUM=$(command -v chromium)" >> .ci/env.sh
if [ -x .ci/postgres.sh ] || [ -f .ci/postgres.sh ]; then
  url=$(bash .ci/postgres.sh 2>/dev/null | tail -n 1)
  [ -n "$url" ] && echo "export ALIGN_TEST_PG_URL=$url" >> .ci/env.sh
fi
cat .ci/env.sh
