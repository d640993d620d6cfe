# Every target sets itself up on a fresh clone: a virtualenv inside the repo, with pinned dependencies.
# Two stamps: the demo needs only the runtime dependencies (torch, Lightning, fsspec, dill, numpy); the
# tests add the dev extra on top of them, without reinstalling what the demo installed.
PYTHON ?= python3
VENV := .venv
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test docs bench bench-quick bench-frozen crashstates clean

$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PIP) -e '.[dev]'
	sh .ci/install-strace
	touch $(STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) examples/demo.py
	@echo
	@echo "Next, look at what it wrote (the CLI lives in the venv: 'source $(VENV)/bin/activate', or call it by path):"
	@echo "  $(VENV)/bin/genesis-ckpt ls demo_checkpoints --verify"
	@echo "  $(VENV)/bin/genesis-ckpt resume-path demo_checkpoints"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q -n 2

# The docs site into site/ (strict: a broken link, a bad docstring or an undocumented public name fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Every benchmark side by side, into benchmarks/results.{md,json,png} (about 75 minutes on 2 cores); bench-quick
# is the reviewers' smoke run (small sizes, 2-3 repeats: about 10 minutes), written to .bench-quick/.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick --out .bench-quick

# Frozen exclusion against full saves on a LoRA-like model (docs/performance.md; about 6 minutes here).
bench-frozen: $(STAMP)
	$(PY) benchmarks/frozen.py

# Power-loss crash states, the full run of docs/crash-states.md (about half an hour on 2 cores).
crashstates: $(STAMP)
	$(PY) benchmarks/crashstates.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
