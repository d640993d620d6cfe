# Every target sets itself up on a fresh clone: a virtualenv inside the repo with pinned dev dependencies.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: demo test lint bench crashstates clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	sh .ci/install-strace
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Power-loss crash states, the full run of docs/crash-states.md (about 6 minutes here).
crashstates: $(STAMP)
	$(PY) benchmarks/crashstates.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
