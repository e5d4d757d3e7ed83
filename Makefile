# The two commands: `make demo` runs the main job, `make test` the test suite.
# Each creates .venv on first use with the pinned dependencies from pyproject.toml (PyPI only).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
JOBS   ?= 2

.PHONY: demo test regress bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# The main job: train (cached) and quantize the digits CNN, run the whole test split on the
# accelerator and compare every logit with the golden model.
DEMO_BACKEND ?= rtl
DEMO_CONFIG  ?= ecp5
demo: $(STAMP)
	$(VENV)/bin/tinyaccel infer --model digits-cnn --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --json build/demo.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -n $(JOBS) --dist loadfile -m "not slow"

regress: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadfile -m slow
	$(PY) -m tinyaccel.sim.regress --config ice40 --programs 1000
	$(PY) -m tinyaccel.sim.regress --config ecp5 --programs 1000

bench: $(STAMP)
	$(VENV)/bin/tinyaccel bench --json build/bench.json

clean:
	rm -rf build .pytest_cache .hypothesis
