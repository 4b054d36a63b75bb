# Set-up and the two commands of the README. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saeflow ingest --out outputs/data/images.parquet \
		--manifest outputs/data/manifest.json
	$(VENV)/bin/saeflow patches --dataset outputs/data/images.parquet \
		--out outputs/data/patches.arrow --transform outputs/data/transform.safetensors
	$(VENV)/bin/saeflow exercise --store outputs/data/patches.arrow --out outputs/exercise

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/ufldl_natural.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
