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
