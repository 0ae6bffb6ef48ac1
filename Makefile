# The two commands a newcomer needs: `make run` and `make test`.
# Everything they need is installed from this file into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# Test worker processes (pytest-xdist). Most of a test's time is spent waiting on
# receiver processes, Postgres and loopback HTTP, so three share two cores well
# (the suite: 674 s in one process, 195 s in three). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3

.PHONY: run test check links fmt bench schema lock clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## start the receiver on an embedded Postgres with generated dev secrets
	$(BIN)/receiver serve --dev

test: $(STAMP)  ## the whole suite
	$(BIN)/pytest -n $(TEST_WORKERS)

check: $(STAMP) links  ## format, lint, import walls, type checks, links, and the suite under branch coverage with its floor
	$(BIN)/ruff format --check receiver tests bench
	$(BIN)/ruff check receiver tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -q -n $(TEST_WORKERS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

links: $(STAMP)  ## the documents' relative links and file references exist; code cites sections that do
	$(BIN)/pytest -q -p no:randomly -p no:cacheprovider tests/unit/test_links.py

bench: $(STAMP)  ## the benchmark against this machine's ceilings (see bench/README.md)
	$(BIN)/python -m bench.run

schema: $(STAMP)  ## rewrite sql/schema.sql from the migrations (after adding one)
	$(BIN)/python -m tests.schema $(RECEIVER_TEST_DATABASE_URL)

lock: $(STAMP)  ## rewrite requirements.lock (what the image installs) from pyproject.toml
	$(BIN)/pip-compile --quiet --extra fast --generate-hashes --strip-extras \
	    --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

fmt: $(STAMP)
	$(BIN)/ruff format receiver tests bench
	$(BIN)/ruff check --fix receiver tests bench

clean:
	rm -rf $(VENV) .receiver .pytest_cache .mypy_cache .ruff_cache
