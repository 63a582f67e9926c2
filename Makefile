# The two commands the README promises: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint

# Reinstall whenever pyproject.toml changes; the stamp keeps repeated runs fast.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[postgres,mysql,test]'
	touch $@

install: $(VENV)/.installed

# Migrate the configured database (the embedded SQLite file by default) and serve webhooks.
run: install
	$(BIN)/connector migrate
	$(BIN)/connector serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite, on SQLite, PostgreSQL and MariaDB (see tests/conftest.py for the server URLs).
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (see docs/performance.md). Each creates and drops its own coherent_bench_* databases on
# the PostgreSQL at BENCH_POSTGRES_URL (default: the local server) and prints its figures.
.PHONY: bench-deps bench bench-ingest bench-sqlite bench-bulk bench-growth bench-rebuild bench-profile

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[postgres,mysql,test,bench]'
	touch $@

# wrk is the HTTP load tool; it comes from the OS packages.
bench-deps: $(VENV)/.bench-installed
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)

bench-ingest: bench-deps
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

bench-sqlite: bench-deps
	$(BIN)/python bench/ingest.py --database sqlite --workers 4 $(BENCH_ARGS)

bench-bulk: bench-deps
	$(BIN)/python bench/bulk_import.py $(BENCH_ARGS)

bench-growth: bench-deps
	$(BIN)/python bench/growth.py $(BENCH_ARGS)

bench-rebuild: bench-deps
	$(BIN)/python bench/rebuild.py $(BENCH_ARGS)

bench-profile: install
	$(BIN)/python bench/profile_ingest.py $(BENCH_ARGS)

bench: bench-ingest bench-sqlite bench-bulk bench-growth bench-rebuild
