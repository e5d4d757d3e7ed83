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

# The main job, co-simulated on the Verilated accelerator (every GEMM on the RTL):
#  1. INT8 inference: train (cached) and quantize the digits CNN, run all 360 test images on the
#     RTL, compare every logit with the golden model, print cycles and MAC utilization per layer;
#  2. INT8 training: three epochs of fp32 / int8-naive / octo / LAC-only / PRC-only from one seed,
#     forward and backward GEMMs on the RTL, the trained model evaluated on the RTL, and the
#     comparison table (run folder with plot: build/demo-train/);
#  3. the resident model: the same inference as ONE program per image (activations and weights on
#     chip, docs/resident.md); the link bytes per image it prints stand beside those of step 1;
#  4. PASS video: a static-camera clip through the segmentation model, one program per frame,
#     unchanged patches skipped on the RTL; speedup, IoU dense vs PASS, threshold 0 == dense,
#     RTL == golden; plots and an animation in build/demo-video/ (docs/pass.md);
#  5. SGQ collaborative learning: the digits CNN cut after relu2, the device half trained with
#     Octo on the RTL, its features sent as FP32 / INT8 / uniform 2-bit / SGQ encoded by the RTL
#     (checked byte for byte against the golden model); the table of accuracy against uplink
#     bytes and the trade-off plot in build/demo-collab/ (docs/collab.md).
DEMO_BACKEND ?= rtl
DEMO_CONFIG  ?= ecp5
DEMO_EPOCHS  ?= 3
DEMO_FRAMES  ?= 16
DEMO_COLLAB_EPOCHS ?= 2
demo: $(STAMP)
	$(VENV)/bin/tinyaccel infer --model digits-cnn --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --json build/demo-infer.json
	$(VENV)/bin/tinyaccel train --model digits-cnn --compare --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --epochs $(DEMO_EPOCHS) --run-dir build/demo-train --json build/demo-train.json
	$(VENV)/bin/tinyaccel infer --model digits-cnn --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --placement resident --json build/demo-infer-resident.json
	$(VENV)/bin/tinyaccel video --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --frames $(DEMO_FRAMES) --out build/demo-video --json build/demo-video.json
	$(VENV)/bin/tinyaccel collab --model digits-cnn --backend $(DEMO_BACKEND) --config $(DEMO_CONFIG) --epochs $(DEMO_COLLAB_EPOCHS) --seeds 0 --codec fp32 --codec int8 --codec u2-tensor --codec sgq --budget 1.5 --headline 1.5 --out build/demo-collab --json build/demo-collab.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -n $(JOBS) --dist loadfile -m "not slow"

regress: $(STAMP)
	TINYACCEL_SEED=random $(PY) -m pytest -n $(JOBS) --dist loadfile -m slow
	$(VENV)/bin/tinyaccel regress --config ice40 --config ecp5 --programs 1000

bench: $(STAMP)
	$(VENV)/bin/tinyaccel bench --json build/bench.json

clean:
	rm -rf build .pytest_cache .hypothesis
