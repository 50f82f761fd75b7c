# Two entry points, both doing all set-up on a fresh clone:
#   make quickstart   the main job on the built-in default (tiny model, built-in world, SQLite store)
#   make test         the test suite
PY := .venv/bin/python
VENV := .venv/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: quickstart test lint system venv

$(VENV): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e ".[dev]"
	rm -f .venv/.installed-*
	touch $@

venv: $(VENV)

# Debian packages the browser and PostgreSQL tests use (root only; skipped tests say why otherwise).
system:
	@bash .ci/system.sh

quickstart: $(VENV)
	$(PY) -m align.quickstart configs/quickstart.yaml

test: $(VENV) system
	@. .ci/env.sh 2>/dev/null; $(PY) -m pytest -q

lint: $(VENV)
	.venv/bin/ruff check .
