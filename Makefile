# Set-up and the two commands of the README. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip byte-compiles what it installs on one core; compileall on every core does the same
	# (166 against 205 s here). As with pip, a file this Python cannot compile (torch ships
	# a Python 3.12-only test file) is skipped, hence the `|| true`.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]"
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	touch $(STAMP)

# the environment alone (.venv with the project installed)
install: $(STAMP)

# the whole pipeline (dvc.yaml) on the built-in data, then where everything is
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(VENV)/bin/saeflow summary

test: $(STAMP)
	$(VENV)/bin/ruff check .
	# two test processes, each module whole in one of them (its tests run in order; the
	# scheduler in tests/conftest.py); the suite is CPU-bound on two cores, so a third
	# process gains nothing (868 against 885 s, 22.5 against 22.7 CPU-minutes)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/ufldl_natural.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/overhead.py

clean:
	-$(VENV)/bin/saeflow server stop
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
