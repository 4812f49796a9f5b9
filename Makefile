# The README's two commands: `make demo` and `make test`. Both create the pinned
# virtual environment in .venv on first use (see README "Install").
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
# GPU=1: also install TensorFlow's CUDA libraries (requirements-gpu.txt).
GPU ?=
STAMP := $(VENV)/.installed$(if $(GPU),-gpu,)
UV_VERSION := 0.5.4
PYTEST_ARGS ?=
# Extra flags for `python -m benchmark.demo` (e.g. DEMO_FLAGS="--scale tiny").
DEMO_FLAGS ?=

.PHONY: install test demo clean-venv

install: $(STAMP)

# TFF 0.87 pins jaxlib 0.4.14, which was never published; overrides.txt
# replaces jax/jaxlib with 0.4.13 (verified to work; README "Install").
$(STAMP): requirements.txt requirements-gpu.txt overrides.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(VPY) -r requirements.txt $(if $(GPU),-r requirements-gpu.txt,) --override overrides.txt
	$(VENV)/bin/uv pip install --python $(VPY) --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) -m benchmark.demo $(if $(DATASET_DIR),--dataset_dir $(DATASET_DIR),) $(DEMO_FLAGS)

clean-venv:
	rm -rf $(VENV)
