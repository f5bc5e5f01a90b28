# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-hub test lint typecheck layers protos protos-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

demo-hub: $(STAMP)
	$(BIN)/python scripts/demo_hub.py

# pytest-xdist workers for `make test`. Serial, the suite mostly waits on subprocesses and sockets (about 165 s of
# CPU in 300 s of wall time), so on 2 cores more workers than cores pay: on the 2-core dev box, nearly idle, pytest
# took 263 s serial and 99 s with -n 4; busy with other runs, 296-421 s serial, 173-313 s with -n 4, 129-245 s
# with -n 2/3/6 (the other load moved it more than the count did): 4 keeps both cores busy while tests wait. `make test PYTEST_WORKERS=0` runs it serially, as plain
# `pytest` does. --dist load: any test to any worker (not loadgroup: pytest 9.2 silently ignores xdist_group,
# pytest-dev/pytest-xdist#1386).
PYTEST_WORKERS ?= 4

test: $(STAMP) lint typecheck layers protos-check
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist load

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

bench: $(STAMP)
	$(BIN)/python bench/bench_planner.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
