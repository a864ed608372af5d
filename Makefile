# The two commands:  make demo   |   make test
# Each creates the virtual environment (.venv) first when it is missing or out of date.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No wheel cache: torch's CUDA wheels are ~4 GB, and a cached copy of them doubled the install's
# peak disk use (a CI run once died of a full disk while installing).
PIP := $(PY) -m pip -q --no-cache-dir
DIGITS := data/digits/dataset.json

.PHONY: setup demo test test-fast bench-accuracy bench-speed lint clean

$(STAMP): requirements.txt requirements-dev.txt requirements-deepspeed.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -r requirements-deepspeed.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

$(DIGITS): | $(STAMP)
	$(VENV)/bin/prunepipe data digits --out data/digits

# A small CPU search: dense baseline, 6 trials (one per method) x 2 DDP workers, a registered model and a table.
demo: $(STAMP) $(DIGITS)
	$(VENV)/bin/prunepipe search configs/demo.yaml

# The whole suite, slow multi-process tests (torchrun, Ray) included. PYTHONFAULTHANDLER: a crash
# after the last test (CI once saw a segmentation fault at exit) prints every thread's stack.
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q --durations=25

# Without the multi-process tests, for a quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Accuracy at equal MACs on the digits, every method, 3 seeds (about 25 min on 2 cores).
bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py --out docs/accuracy_table.md

# Dense vs pruned throughput at 224x224 (CPU here; GPU where there is one).
bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline methods launch tests benchmarks

clean:
	rm -rf runs data .pytest_cache
